"""KV transfer: the layout handshake names every disagreeing field, payloads round-trip through
bytes and reject damaged ones, and a prefill engine -> in-process transport -> decode engine gives
the greedy tokens of one colocated engine while the decode engine computes only the prompt's tail."""

import dataclasses

import numpy as np
import pytest

from jaxserve.kv.disagg_connector import DecodeConnector, PrefillConnector
from jaxserve.kv.transfer import InProcessTransport, KVHandshakeError, KVLayout, KVPayload, check_handshake
from models.kv_spec import KVSpec
from tests.engine_utils import random_prompts, tiny_config, tiny_deepseek_config, tiny_engine, tiny_loaded_model
from tests.jaxserve.kv.kv_utils import generate
from tests.jaxserve.test_engine import assert_same_greedy

LAYOUT = KVLayout.of("tiny-llama-0", 4, "float32", KVSpec.standard(num_layers=2, num_kv_heads=2, head_dim=16))


@pytest.mark.parametrize("field,value", [
    ("model", "tiny-llama-1"), ("block_size", 8), ("kv_dtype", "bfloat16"),
    ("kv_spec", KVSpec.standard(3, 2, 16).signature()), ("kv_spec", KVSpec.standard(2, 4, 16).signature()),
    ("kv_spec", KVSpec.standard(2, 2, 32).signature()), ("token_elements", 96), ("kv_scales", (0.5, 0.5)),
    ("layout", "blocks[k,v][layer]"),
])
def test_handshake_mismatch_names_the_field(field, value):
    remote = dataclasses.replace(LAYOUT, **{field: value})
    with pytest.raises(KVHandshakeError, match=rf"disagree on {field} \(local .*, remote .*\)"):
        check_handshake(LAYOUT, remote)
    check_handshake(LAYOUT, dataclasses.replace(LAYOUT))


def test_transport_handshake_guards_every_block():
    transport = InProcessTransport()
    payload = KVPayload(LAYOUT, [b"h"], np.zeros((1, *LAYOUT.block_shape), np.float32))
    with pytest.raises(KVHandshakeError, match="no handshake yet"):
        transport.put(payload)
    assert transport.handshake(LAYOUT) == LAYOUT
    with pytest.raises(KVHandshakeError, match="block_size"):
        transport.handshake(dataclasses.replace(LAYOUT, block_size=8))
    with pytest.raises(KVHandshakeError, match="kv_dtype"):
        other = dataclasses.replace(LAYOUT, kv_dtype="float16")
        transport.put(KVPayload(other, [b"h"], np.zeros((1, *LAYOUT.block_shape), np.float16)))
    with pytest.raises(KeyError, match="not on the other side"):
        transport.fetch([b"missing"])


def test_payload_round_trips_and_damaged_payloads_are_rejected():
    rng = np.random.default_rng(0)
    hashes = [bytes([i]) * 32 for i in range(3)]
    payload = KVPayload(LAYOUT, hashes, rng.standard_normal((3, *LAYOUT.block_shape)).astype(np.float32))
    data = payload.to_bytes()
    back = KVPayload.from_bytes(data, LAYOUT)
    assert back.layout == LAYOUT and back.block_hashes == hashes
    np.testing.assert_array_equal(back.blocks, payload.blocks)
    with pytest.raises(ValueError, match="body must be"):
        KVPayload.from_bytes(data[:-4])
    with pytest.raises(ValueError, match="magic"):
        KVPayload.from_bytes(b"XXXX" + data[4:])
    with pytest.raises(KVHandshakeError, match="kv_spec"):
        KVPayload.from_bytes(data, KVLayout.of("tiny-llama-0", 4, "float32", KVSpec.standard(2, 2, 8)))
    with pytest.raises(ValueError, match="blocks must have shape"):
        KVPayload(LAYOUT, hashes[:2], payload.blocks)


def test_transport_moves_blocks_one_by_one_within_a_byte_budget_lru():
    """capacity_bytes holds 3 block messages: a 4th put drops the least recently used block (a
    lookup makes a block recent); a fetched block is dropped once fetched."""
    message_bytes = len(KVPayload(LAYOUT, [b"x"], np.zeros((1, *LAYOUT.block_shape), np.float32)).to_bytes())
    with pytest.raises(ValueError, match="capacity_bytes must be an integer >= 1"):
        InProcessTransport(0)
    transport = InProcessTransport(capacity_bytes=3 * message_bytes)
    transport.handshake(LAYOUT)
    blocks = np.arange(5 * int(np.prod(LAYOUT.block_shape)), dtype=np.float32).reshape(5, *LAYOUT.block_shape)
    hashes = [bytes([i]) for i in range(5)]
    transport.put(KVPayload(LAYOUT, hashes[:4], blocks[:4]))
    assert transport.lookup(hashes) == 0, "the oldest block was dropped: no leading run"
    assert transport.lookup(hashes[1:]) == 3 and transport.bytes_held == 3 * message_bytes
    assert transport.num_dropped_blocks == 1
    assert transport.lookup(hashes[1:2]) == 1  # block 1 is now the most recently used
    transport.put(KVPayload(LAYOUT, hashes[4:], blocks[4:]))  # drops block 2, the least recent
    assert [transport.lookup([h]) for h in hashes] == [0, 1, 0, 1, 1]
    got = transport.fetch(hashes[3:]).result(timeout=10)
    np.testing.assert_array_equal(got.blocks, blocks[3:])
    assert transport.bytes_sent >= 2 * LAYOUT.block_bytes
    assert transport.lookup(hashes[3:4]) == 0 and transport.num_blocks == 1, "fetched blocks are dropped"
    assert transport.bytes_held == message_bytes
    small = InProcessTransport(message_bytes - 1)
    small.handshake(LAYOUT)
    with pytest.raises(ValueError, match=r"capacity_bytes \(\d+\) must hold at least one block"):
        small.put(KVPayload(LAYOUT, hashes[:1], blocks[:1]))


def test_transport_keeps_a_fetched_block_another_pending_request_needs():
    """Two requests share a prefix block: the first fetch leaves it (one reader pending), the
    second drops it; `read` + `release` (the gRPC service's streamed fetch) settles like `fetch`."""
    transport = InProcessTransport()
    transport.handshake(LAYOUT)
    blocks = np.ones((3, *LAYOUT.block_shape), np.float32)
    shared, a, b = b"s", b"a", b"b"
    transport.put(KVPayload(LAYOUT, [shared, a], blocks[:2]))
    transport.put(KVPayload(LAYOUT, [shared, b], blocks[1:]))
    transport.fetch([shared, a]).result(timeout=10)
    assert transport.lookup([shared, b]) == 2 and transport.lookup([a]) == 0
    assert all(m is not None for m in transport.read([shared, b]))
    transport.release([shared, b])
    assert transport.num_blocks == 0 and transport.bytes_held == 0
    assert transport.read([shared]) == [None]


def test_wait_for_save_waits_for_its_own_request_whatever_other_threads_wait_for():
    """The engine thread finishes 12 requests one by one while 12 threads each wait for one of
    them; the transport's put is slow (30 ms). Each waiter must see all of its blocks on the other
    side the moment `wait_for_save(request_id)` returns (a shared list swapped without a lock let
    one waiter take another's saves and the other return early: the decode side then recomputed)."""
    import threading
    import time

    from jaxserve.request import Request

    class SlowTransport(InProcessTransport):
        def put(self, payload):
            time.sleep(0.03)
            super().put(payload)

    transport = SlowTransport()
    connector = PrefillConnector(transport)
    engine = tiny_engine(tiny_loaded_model(), kv_connector=connector)
    rng = np.random.default_rng(7)
    requests, hashes = [], []
    for i in range(12):
        prompt = rng.integers(1, 90, size=4 * (i % 3 + 2) + 1).tolist()
        request = Request(f"r{i}", prompt, max_tokens=1)
        request.num_computed_tokens = len(prompt)
        requests.append(request)
        hashes.append(engine.kv_manager.block_hashes(request))
    num_blocks = [(r.num_prompt_tokens - 1) // 4 for r in requests]
    seen, failures = [None] * 12, []

    def waiter(i):
        try:
            connector.wait_for_save(f"r{i}", timeout_s=30)
            seen[i] = transport.lookup(hashes[i][:num_blocks[i]])
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=waiter, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for i, request in enumerate(requests):  # the engine thread: one finished request at a time
        connector.request_finished(request, list(range(1, num_blocks[i] + 2)), hashes[i])
        time.sleep(0.005)
    for t in threads:
        t.join(60)
    assert not failures, failures
    assert seen == num_blocks, "a waiter returned before its own blocks were saved"
    with pytest.raises(TimeoutError, match="'never' did not finish within 0.05 s"):
        connector.wait_for_save("never", timeout_s=0.05)


def test_decode_engine_with_another_block_size_fails_the_handshake():
    loaded = tiny_loaded_model()
    transport = InProcessTransport()
    tiny_engine(loaded, kv_connector=PrefillConnector(transport))
    with pytest.raises(KVHandshakeError, match=r"block_size \(local 8, remote 4\)"):
        tiny_engine(loaded, block_size=8, kv_connector=DecodeConnector(transport, 8))
    with pytest.raises(KVHandshakeError, match="model"):
        other = tiny_loaded_model(tiny_config(), seed=1)
        tiny_engine(other, kv_connector=DecodeConnector(transport, 4))


@pytest.mark.parametrize("family", ["llama", "deepseek"])
def test_prefill_then_decode_engines_match_a_colocated_engine(family):
    """Prompts of 3..150 tokens (up to 37 blocks: more than one 32-block chunk): the prefill engine computes each prompt (max_tokens=1) and saves its
    full blocks; the decode engine loads them, computes only the tail, and its greedy tokens equal
    the colocated engine's (DESIGN.md near-tie rule). DeepSeek's blocks are latent rows."""
    loaded = tiny_loaded_model(tiny_deepseek_config() if family == "deepseek" else None)
    rng = np.random.default_rng(3)
    prompts = random_prompts(rng, 10, 3, 150, 96)
    transport = InProcessTransport()
    prefill_connector = PrefillConnector(transport)
    decode_connector = DecodeConnector(transport, 4)
    prefill = tiny_engine(loaded, kv_connector=prefill_connector)
    decode = tiny_engine(loaded, kv_connector=decode_connector)
    colocated = tiny_engine(loaded)

    generate(prefill, prompts, max_tokens=1, tag="p")
    prefill_connector.wait_for_save()
    got, rows = generate(decode, prompts, max_tokens=10, tag="d")
    ref, _ = generate(colocated, prompts, max_tokens=10, tag="c")

    full_blocks = [(len(p) - 1) // 4 for p in prompts]
    assert prefill_connector.num_saved_blocks == sum(full_blocks), "only blocks a decode side can load"
    assert decode_connector.num_loaded_blocks == sum(full_blocks)
    assert transport.num_blocks == 0, "every saved block was fetched, then dropped"
    # vLLM's external prefix-cache counters: the tokens asked of the connector, the tokens it gave.
    assert decode_connector.external_prefix_cache_queries == sum(len(p) for p in prompts)
    assert decode_connector.external_prefix_cache_hits == 4 * sum(full_blocks)
    assert decode.kv_manager.prefix_cache_hits == 0, "connector hits are not device prefix-cache hits"
    for i, prompt in enumerate(prompts):
        first = rows[i][0]
        assert first.num_computed_tokens == 4 * full_blocks[i], f"prompt {i}: prefix loaded"
        assert first.num_computed_tokens + first.num_new_tokens == len(prompt)
        assert_same_greedy(got[i].token_ids, ref[i].token_ids, ref[i].logprobs, f"prompt {i}")
    assert transport.bytes_sent >= sum(full_blocks) * decode.kv_layout.block_bytes


def test_block_io_scatter_then_gather_round_trips_in_chunks():
    """40 blocks (two chunks) of random values in, the same out; other blocks untouched."""
    engine = tiny_engine(tiny_loaded_model())
    block_io = engine.kv_connector.block_io
    rng = np.random.default_rng(0)
    ids = rng.permutation(np.arange(1, engine.kv_plan.num_blocks))[:40].tolist()
    blocks = rng.standard_normal((40, *block_io.layout.block_shape)).astype(np.float32)
    before = np.asarray(engine.runner.kv_caches[0].arrays[0])
    block_io.scatter(ids, blocks)
    np.testing.assert_array_equal(block_io.to_host(block_io.gather(ids), 40), blocks)
    after = np.asarray(engine.runner.kv_caches[0].arrays[0])
    others = np.setdiff1d(np.arange(engine.kv_plan.num_blocks), ids)
    np.testing.assert_array_equal(after[others], before[others])
    k_size = after[0].size  # layer 0's K leads each block (models/kv_spec.py order)
    np.testing.assert_array_equal(after[ids], blocks[:, :k_size].reshape(after[ids].shape))
