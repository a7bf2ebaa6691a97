"""A soak-test client process: `python -m tests.server.soak_client TARGET STREAMS SEED CANCEL_FRACTION`.

Opens STREAMS concurrent Generate streams (grpc.aio), cancels CANCEL_FRACTION of them after their
first chunk, reads the rest to the end, prints "started" once every stream has its first chunk,
and at the end one JSON line: {"completed": [token counts], "cancelled": n, "errors": [...]}."""

from __future__ import annotations

import asyncio
import json
import random
import sys

import grpc

from server import generation_pb2 as pb
from server import generation_pb2_grpc as pb_grpc

MAX_TOKENS = 12


async def main(target: str, streams: int, seed: int, cancel_fraction: float) -> dict:
    rng = random.Random(seed)
    first_chunks = asyncio.Semaphore(0)
    result = {"completed": [], "cancelled": 0, "errors": []}

    async def one(stub, index: int) -> None:
        prompt = [5 + rng.randrange(80) for _ in range(rng.randrange(1, 40))]
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=pb.SamplingParams(
            max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
        cancel = rng.random() < cancel_fraction
        call = stub.Generate(request, timeout=600)
        tokens, first = 0, True
        try:
            async for chunk in call:
                tokens += len(chunk.token_ids)
                if first:
                    first = False
                    first_chunks.release()
                    if cancel:
                        call.cancel()
                        result["cancelled"] += 1
                        return
            result["completed"].append(tokens)
        except grpc.aio.AioRpcError as error:
            result["errors"].append(f"{error.code().name}: {error.details()}")
            if first:
                first_chunks.release()

    async def announce() -> None:
        for _ in range(streams):
            await first_chunks.acquire()
        print("started", flush=True)

    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        await asyncio.gather(announce(), *(one(stub, i) for i in range(streams)))
    return result


if __name__ == "__main__":
    target, streams, seed, fraction = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    print(json.dumps(asyncio.run(main(target, streams, seed, fraction))), flush=True)
