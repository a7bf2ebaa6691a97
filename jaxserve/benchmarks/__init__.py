"""Engine benchmarks that report against ceilings measured in the same run.

Each module's `add_parser(sub)` adds its `jaxserve bench NAME` subcommand (with `bench=run` as the
default to call); the `jaxserve` command (server/main.py) assembles them beside the serving
benchmarks, which are gRPC clients and live in server/."""
