"""`jaxserve bench ...`: benchmarks that report against ceilings measured in the same run."""

from __future__ import annotations

import argparse


def add_bench_parsers(parser: argparse.ArgumentParser) -> None:
    from jaxserve.benchmarks import kernels, throughput

    sub = parser.add_subparsers(dest="bench_name", required=True)
    throughput.add_parser(sub)
    kernels.add_parser(sub)


def run_benchmark(args: argparse.Namespace) -> int:
    return args.bench(args)
