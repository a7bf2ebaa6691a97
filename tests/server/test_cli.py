"""The `jaxserve` command (server/main.py): every EngineConfig and ServerOptions field is a `serve`
flag, parsed; `bench` gathers the engine's and the server's benchmarks."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest

from jaxserve.config import GROUP_OF
from jaxserve.engine_flags import engine_config_from_args
from server.app import ServerOptions
from server.cli import server_options_from_args
from server.main import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_engine_and_server_option_is_a_serve_flag():
    parser = build_parser()
    serve = _subcommands(parser)["serve"]
    flags = {option for action in serve._actions for option in action.option_strings}
    names = [*GROUP_OF, *(field.name for field in dataclasses.fields(ServerOptions))]
    for name in names:
        assert "--" + name.replace("_", "-") in flags, name


def test_serve_flags_reach_the_configs():
    args = build_parser().parse_args(["serve", "--port", "0", "--api-key", "k", "--stream-interval", "4",
                                      "--max-model-len", "auto", "--no-enable-prefix-caching",
                                      "--max-waiting-requests", "7", "--shutdown-grace-s", "2.5"])
    config = engine_config_from_args(args)
    assert (config.stream_interval, config.max_model_len, config.enable_prefix_caching) == (4, "auto", False)
    options = server_options_from_args(args)
    assert (options.host, options.port, options.api_key, options.max_waiting_requests, options.shutdown_grace_s) == (
        "127.0.0.1", 0, "k", 7, 2.5)


def test_the_http_api_is_on_8000_unless_told_otherwise():
    parse = lambda *flags: server_options_from_args(build_parser("serve").parse_args(["serve", *flags]))  # noqa: E731
    assert parse().http_port == 8000
    assert parse("--http-port", "0").http_port == 0
    assert parse("--http-port", "-1").http_port is None  # no HTTP API
    assert ServerOptions().http_port is None  # in Python: only when asked
    options = parse("--tool-call-parser", "hermes", "--reasoning-parser", "think")
    assert (options.tool_call_parser, options.reasoning_parser) == ("hermes", "think")
    with pytest.raises(SystemExit):
        parse("--tool-call-parser", "nonesuch")


@pytest.mark.parametrize("options, field", [
    (dict(http_port=-2), "http_port"), (dict(tool_call_parser="x"), "tool_call_parser"),
    (dict(reasoning_parser="x"), "reasoning_parser"),
    (dict(port=70000), "port"), (dict(tls_cert="c.pem"), "tls_cert"), (dict(max_waiting_requests=0), "max_waiting_requests"),
    (dict(max_message_bytes=10), "max_message_bytes"), (dict(shutdown_grace_s=-1), "shutdown_grace_s"),
])
def test_bad_server_options_name_the_field(options, field):
    with pytest.raises(ValueError, match=field):
        ServerOptions(**options)


def _subcommands(parser) -> dict:
    return parser._subparsers._group_actions[0].choices


def test_bench_gathers_the_engine_and_server_benchmarks():
    bench = _subcommands(build_parser("bench"))["bench"]
    assert set(_subcommands(bench)) == {"throughput", "latency", "speculative", "structured", "kernels", "host-tier",
                                        "serve", "disagg"}
    args = build_parser("bench").parse_args(["bench", "throughput", "--num-prompts", "3", "--block-size", "32"])
    assert (args.num_prompts, engine_config_from_args(args).block_size) == (3, 32)


def test_serve_leaves_the_benchmarks_unimported():
    """`jaxserve serve` binds its ports before jax is imported: its parser skips `bench`'s."""
    bench = _subcommands(build_parser("serve"))["bench"]
    assert bench._subparsers is None


def test_generate_runs_without_grpcio_tools():
    """A bare GPU image has grpc but not grpcio-tools, so the gRPC modules cannot be generated there:
    `jaxserve generate` still parses, and a gRPC module asked for says why it is missing."""
    script = textwrap.dedent("""
        import sys, types
        codegen = types.ModuleType("server._codegen")
        def ensure_generated():
            raise ImportError("server/generation_pb2.py is missing and grpcio-tools is not installed")
        codegen.ensure_generated = ensure_generated
        sys.modules["server._codegen"] = codegen
        from server.main import build_parser
        assert build_parser("generate").parse_args(["generate", "hi", "--block-size", "32"]).block_size == 32
        assert "server.app" not in sys.modules and "grpc" not in sys.modules
        try:
            from server import generation_pb2
        except ImportError as exc:
            print(exc)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "server/generation_pb2.py is missing and grpcio-tools is not installed"
