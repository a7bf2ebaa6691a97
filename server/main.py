"""The `jaxserve` command: generate, convert, bench, serve, router (`python -m server.main`).

The top of the stack: it assembles its subcommands from the engine (`jaxserve.engine_flags`, the
engine benchmarks' `add_parser`) and from the server's own flags (server/cli.py)."""

from __future__ import annotations

import argparse
import logging
import sys

from jaxserve.config import FP8_WEIGHTS, EngineConfig
from jaxserve.engine_flags import add_engine_flags, engine_config_from_args


def cmd_generate(args) -> int:
    from jaxserve.llm import LLM
    from jaxserve.sampling_params import SamplingParams

    config = engine_config_from_args(args)
    if _follow(config):
        return 0
    llm = LLM(config=config)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature or 0.0,
                            top_p=args.top_p, seed=args.seed_sampling)
    prompt = args.prompt
    if args.chat:
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    sys.stdout.write(args.prompt if not args.chat else "")
    for delta in llm.stream(prompt, params):
        sys.stdout.write(delta.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_convert(args) -> int:
    import jax.numpy as jnp

    from models.loader import convert

    convert(args.src, args.dst, dtype=jnp.dtype(args.dtype), fp8_weights=args.fp8_weights)
    print(f"wrote {args.dst}")
    return 0


def cmd_bench(args) -> int:
    builds_engine = args.bench_name in ("throughput", "latency", "speculative") or getattr(args, "backend", None) == "python"
    if builds_engine and _follow(engine_config_from_args(args)):
        return 0
    return args.bench(args)


def cmd_serve(args) -> int:
    # No jax until run_server has bound the ports: a busy one ends the command in seconds.
    from jaxserve.distributed_spec import spec_of
    from server.cli import run_server

    config = engine_config_from_args(args)
    if getattr(args, "role", "colocated") != "colocated" and spec_of(config).is_multihost:
        raise SystemExit(f"--role {args.role} needs num_processes 1: KV transfers would split the processes' "
                         "schedules")
    if _follow(config):
        return 0
    return run_server(args, config)


def _follow(config: EngineConfig) -> bool:
    """Multi-host: processes other than 0 follow the leader's engine until it stops, then exit."""
    from jaxserve.distributed_spec import is_follower

    if not is_follower(config):
        return False
    from jaxserve.distributed import run_follower

    run_follower(config)
    return True


def cmd_router(args) -> int:
    from server.cli import run_router

    return run_router(args)


def add_bench_parsers(parser: argparse.ArgumentParser) -> None:
    """`jaxserve bench NAME`: the engine's offline benchmarks, then the online ones (gRPC, HTTP or
    AsyncLLM clients)."""
    from jaxserve.benchmarks import host_tier, kernels, latency, spec_decode, structured, throughput
    from server import bench as serve_bench
    from server import bench_disagg

    sub = parser.add_subparsers(dest="bench_name", required=True)
    for benchmark in (throughput, latency, spec_decode, structured, kernels, host_tier, serve_bench, bench_disagg):
        benchmark.add_parser(sub)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every subcommand; given the `command` being run, others may be left without their flags."""
    parser = argparse.ArgumentParser(prog="jaxserve", description="LLM serving engine in JAX")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="one-shot generation streamed to the terminal")
    gen.add_argument("prompt")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=None, help="greedy unless given")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed-sampling", type=int, default=None, help="per-request sampling seed")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    add_engine_flags(gen)
    gen.set_defaults(func=cmd_generate, compile_at_startup=False)

    conv = sub.add_parser("convert", help="HF folder or GGUF file to an orbax checkpoint folder")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--dtype", default="float32")
    conv.add_argument("--fp8-weights", default="auto", choices=FP8_WEIGHTS,
                      help="a block-FP8 source's weights: kept as fp8 with block scales, or dequantized to --dtype "
                           "(auto: kept on a GPU)")
    conv.set_defaults(func=cmd_convert)

    bench = sub.add_parser("bench", help="benchmarks")
    if command in (None, "bench"):  # they import jax; `jaxserve serve` binds its ports before that
        add_bench_parsers(bench)
    bench.set_defaults(func=cmd_bench)

    serve = sub.add_parser("serve", help="the gRPC server")
    router = sub.add_parser("router", help="gRPC front over prefill and decode workers (disaggregated)")
    if command in (None, "serve", "router"):  # gRPC: `generate` runs where grpcio-tools is missing
        from server.cli import add_role_flags, add_router_flags, add_server_flags

        add_server_flags(serve)
        add_role_flags(serve)
        add_engine_flags(serve)
        add_router_flags(router)
    serve.set_defaults(func=cmd_serve)
    router.set_defaults(func=cmd_router)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(_command(argv)).parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return args.func(args)


def _command(argv: list[str]) -> str | None:
    """The subcommand `argv` names (after the top-level flags), or None."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] == "--log-level" else 1
    return argv[i] if i < len(argv) else None


if __name__ == "__main__":
    sys.exit(main())
