"""The `jaxserve` command: generate, convert, bench, serve."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing

from jaxserve.config import EngineConfig


# Help for the flags whose meaning is not plain from vLLM's name.
FLAG_HELP = {
    "max_num_seqs": "requests running at once; per dp shard with --data-parallel-size > 1",
    "max_num_batched_tokens": "tokens computed per step; per dp shard with --data-parallel-size > 1",
    "max_num_reqs": "request-state slots on device (default 4 x max-num-seqs x data-parallel-size)",
    "compilation_cache_max_bytes": "size cap of the compilation cache (least recently used entries go first; "
                                   "0: no cap; default 2 GiB)",
}


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """Every `EngineConfig` field as a `--flag` (vLLM's names with dashes)."""
    hints = typing.get_type_hints(EngineConfig)
    for field in dataclasses.fields(EngineConfig):
        flag = "--" + field.name.replace("_", "-")
        hint = hints[field.name]
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif field.name == "max_model_len":
            parser.add_argument(flag, type=_int_or_auto, default=None, help="an integer or 'auto'")
        elif "tuple" in str(hint):
            parser.add_argument(flag, type=_int_tuple, default=None, help="comma-separated integers")
        elif "int" in str(hint):
            parser.add_argument(flag, type=int, default=None, help=FLAG_HELP.get(field.name))
        elif "float" in str(hint):
            parser.add_argument(flag, type=float, default=None)
        else:
            parser.add_argument(flag, type=str, default=None)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)
             if getattr(args, f.name, None) is not None}
    return EngineConfig(**given)


def _int_or_auto(text: str):
    return text if text == "auto" else int(text)


def _int_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


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

    convert(args.src, args.dst, dtype=jnp.dtype(args.dtype))
    print(f"wrote {args.dst}")
    return 0


def cmd_bench(args) -> int:
    from jaxserve.benchmarks import run_benchmark

    if args.bench_name == "throughput" and _follow(engine_config_from_args(args)):
        return 0
    return run_benchmark(args)


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
    conv.set_defaults(func=cmd_convert)

    bench = sub.add_parser("bench", help="benchmarks")
    if command in (None, "bench"):  # they import jax; `jaxserve serve` binds its ports before that
        from jaxserve.benchmarks import add_bench_parsers

        add_bench_parsers(bench)
    bench.set_defaults(func=cmd_bench)

    serve = sub.add_parser("serve", help="the gRPC server")
    # The command line is the top of the stack: the one place in jaxserve/ that reaches server/.
    from server.cli import add_role_flags, add_router_flags, add_server_flags

    add_server_flags(serve)
    add_role_flags(serve)
    add_engine_flags(serve)
    serve.set_defaults(func=cmd_serve)

    router = sub.add_parser("router", help="gRPC front over prefill and decode workers (disaggregated)")
    add_router_flags(router)
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
