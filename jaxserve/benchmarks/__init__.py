"""`jaxserve bench ...`: benchmarks that report against ceilings measured in the same run."""

from __future__ import annotations

import argparse


def add_bench_parsers(parser: argparse.ArgumentParser) -> None:
    from jaxserve.benchmarks import host_tier, kernels, throughput

    sub = parser.add_subparsers(dest="bench_name", required=True)
    throughput.add_parser(sub)
    kernels.add_parser(sub)
    host_tier.add_parser(sub)
    # The online benchmark is a gRPC client: it lives with the server (server -> jaxserve).
    from server import bench as serve_bench
    from server import bench_disagg

    serve_bench.add_parser(sub)
    bench_disagg.add_parser(sub)


def run_benchmark(args: argparse.Namespace) -> int:
    return args.bench(args)
