"""A prefill or decode worker over the tiny random-weight engine, as its own process:
`python -m tests.server.disagg_worker ROLE PORT [STEP_DELAY_S]` prints "jaxserve: serving on HOST:PORT".
STEP_DELAY_S slows every engine step (a slow decode worker, so that a test can kill it mid-stream).
Each time the number of Generate calls in flight changes it prints "worker: holds N requests",
so that a test can wait for the requests to arrive instead of sleeping."""

import asyncio
import sys
import time

from server.app import ServerOptions
from server.disagg import build_worker, serve_worker
from tests.engine_utils import tiny_engine, tiny_loaded_model
from tests.server.conftest import ENGINE_OPTIONS


def main() -> None:
    role, port = sys.argv[1], int(sys.argv[2])
    delay = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    loaded = tiny_loaded_model()

    def make_engine(connector):
        engine = tiny_engine(loaded, kv_connector=connector, **ENGINE_OPTIONS)
        if delay:
            step = engine.step
            engine.step = lambda: (time.sleep(delay), step())[1]
        return engine

    def factory():
        server = build_worker(make_engine, role, ServerOptions(port=port, shutdown_grace_s=0.0), "tiny",
                              ENGINE_OPTIONS["block_size"], kv_timeout_s=10.0)
        server.servicer.live = ReportedSet()
        return server

    asyncio.run(serve_worker(factory))


class ReportedSet(set):
    """The servicer's request ids in flight; every add and discard prints how many there are."""

    def add(self, item):
        super().add(item)
        print(f"worker: holds {len(self)} requests", flush=True)

    def discard(self, item):
        if item in self:
            super().discard(item)
            print(f"worker: holds {len(self)} requests", flush=True)


if __name__ == "__main__":
    main()
