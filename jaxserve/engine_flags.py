"""Engine options as command-line flags: every option of every `EngineConfig` group is a `--flag`
(its flat name, vLLM's, with dashes). The `jaxserve` command (server/main.py) and the engine benchmarks that build their
own engine (`jaxserve bench throughput`) share them."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from jaxserve.config import GROUP_OF, GROUPS, EngineConfig

# Help for the flags whose meaning is not plain from vLLM's name.
FLAG_HELP = {
    "max_num_seqs": "requests running at once; per dp shard with --data-parallel-size > 1",
    "max_num_batched_tokens": "tokens computed per step; per dp shard with --data-parallel-size > 1",
    "max_num_reqs": "request-state slots on device (default 4 x max-num-seqs x data-parallel-size)",
    "compilation_cache_max_bytes": "size cap of the compilation cache (least recently used entries go first; "
                                   "0: no cap; default 2 GiB)",
}


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """Every `EngineConfig` option as a `--flag`, listed by group in --help; unset flags stay None
    (the config's default)."""
    for name, group in GROUPS.items():
        section = parser.add_argument_group(f"engine options: {name}", (group.__doc__ or "").split("\n")[0])
        hints = typing.get_type_hints(group)
        for field in dataclasses.fields(group):
            _add_flag(section, field.name, hints[field.name])


def add_engine_benchmark_flags(parser: argparse.ArgumentParser, run, json_help: str = "write the results here") -> None:
    """The tail every engine-building benchmark shares: `--json`, every engine option, and
    `run` as the command; `--seed` (default 0) seeds the engine and the benchmark's inputs."""
    parser.add_argument("--json", default=None, help=json_help)
    add_engine_flags(parser)
    parser.set_defaults(bench=run, seed=0)


def _add_flag(parser, name: str, hint) -> None:
    flag = "--" + name.replace("_", "-")
    if hint is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
    elif name == "max_model_len":
        parser.add_argument(flag, type=_int_or_auto, default=None, help="an integer or 'auto'")
    elif "tuple" in str(hint):
        parser.add_argument(flag, type=_int_tuple, default=None, help="comma-separated integers")
    elif "int" in str(hint):
        parser.add_argument(flag, type=int, default=None, help=FLAG_HELP.get(name))
    elif "float" in str(hint):
        parser.add_argument(flag, type=float, default=None)
    else:
        parser.add_argument(flag, type=str, default=None)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """The `EngineConfig` of the flags given (the others keep its defaults)."""
    given = {name: getattr(args, name) for name in GROUP_OF if getattr(args, name, None) is not None}
    return EngineConfig(**given)


def _int_or_auto(text: str):
    return text if text == "auto" else int(text)


def _int_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)
