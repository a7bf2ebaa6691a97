"""The host KV tier on tiny engines: an evicted prefix comes back from host memory instead of being
recomputed (scheduled token counts) with the same greedy tokens as a tier-off engine; with no hits
nothing is loaded, and with no evictions nothing is copied at all. The eviction test runs on a
per-head K/V model and on DeepSeek's latent cache (one row per token and layer)."""

import itertools

import numpy as np
import pytest

from jaxserve.config import EngineConfig
from jaxserve.kv.host_tier import HostKVTier
from models.kv_spec import KVSpec
from jaxserve.kv.transfer import KVLayout
from jaxserve.request import Request
from models.registry import kv_spec
from tests.engine_utils import random_prompts, tiny_deepseek_config, tiny_engine, tiny_loaded_model
from tests.jaxserve.kv.kv_utils import generate
from tests.jaxserve.test_engine import assert_same_greedy

# 40 blocks of 4 tokens: a few 40-token prompts evict the earlier ones' cached blocks.
SMALL_POOL = dict(max_model_len=64, kv_cache_memory_bytes=40 * 2048)


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded_model()


def counting(block_io):
    """Count batched gathers and scatters on an engine's block I/O."""
    calls = {"gather": 0, "scatter": 0}
    for name in calls:
        method = getattr(block_io, name)

        def wrapper(*args, _name=name, _method=method):
            calls[_name] += 1
            return _method(*args)

        setattr(block_io, name, wrapper)
    return calls


@pytest.fixture(scope="module")
def loaded_deepseek():
    return tiny_loaded_model(tiny_deepseek_config())


@pytest.mark.parametrize("family", ["llama", "deepseek"])
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_evicted_prefix_is_loaded_from_host_not_recomputed(request, family, kv_cache_dtype):
    """Poisoning freed blocks is on: a copy taken after the poison (or none at all) would show as NaN.
    An FP8 cache moves its blocks as stored (a quarter of float32's bytes: so is its budget); a
    DeepSeek block is latent rows (FP8: with one scale per layer)."""
    loaded = request.getfixturevalue("loaded" if family == "llama" else "loaded_deepseek")
    rng = np.random.default_rng(0)
    target = rng.integers(2, 96, 42).tolist()
    fillers = random_prompts(rng, 6, 36, 44, 96)
    block_bytes = 4 * kv_spec(loaded.config).bytes_per_token(np.float32)  # 40 blocks, as SMALL_POOL for Llama
    pool = dict(SMALL_POOL, kv_cache_memory_bytes=40 * block_bytes // (4 if kv_cache_dtype == "fp8" else 1))
    results = {}
    for tier_bytes in (0, 1 << 20):
        engine = tiny_engine(loaded, cpu_kv_cache_bytes=tier_bytes, poison_freed_blocks=True,
                             kv_cache_dtype=kv_cache_dtype, **pool)
        (first,), _ = generate(engine, [target], max_tokens=6, tag="a")
        generate(engine, fillers, max_tokens=4, tag="f")
        hashes = engine.kv_manager.block_hashes(Request("probe", target, max_tokens=1))
        assert not any(engine.kv_manager.block_pool.get_cached_block(h) for h in hashes), "target evicted"
        (again,), (rows,) = generate(engine, [target], max_tokens=6, tag="b")
        results[tier_bytes] = (engine, first, again, rows)

    engine, first, again, rows = results[1 << 20]
    connector = engine.kv_connector
    # (42 - 1) // 4 = 10 full blocks may be loaded; the last 2 tokens are computed.
    assert (rows[0].num_computed_tokens, rows[0].num_new_tokens) == (40, 2)
    assert connector.num_loaded_blocks == 10 and connector.tier.num_saved_blocks > 0
    assert_same_greedy(again.token_ids, first.token_ids, first.logprobs, "host-tier hit vs first run")

    off_engine, off_first, off_again, off_rows = results[0]
    assert (off_rows[0].num_computed_tokens, off_rows[0].num_new_tokens) == (0, 42), "tier off recomputes"
    assert_same_greedy(again.token_ids, off_again.token_ids, off_again.logprobs, "tier on vs off")


def test_no_hits_no_loads_and_no_evictions_no_copies(loaded):
    rng = np.random.default_rng(1)
    prompts = random_prompts(rng, 8, 20, 44, 96)
    # A large pool: nothing is evicted, so nothing is ever copied either way.
    engine = tiny_engine(loaded, cpu_kv_cache_bytes=1 << 20, max_model_len=64)
    calls = counting(engine.kv_connector.block_io)
    generate(engine, prompts, tag="big")
    assert calls == {"gather": 0, "scatter": 0} and len(engine.kv_connector.tier) == 0
    # A small pool: evictions are saved (one batched gather per eviction), but no hit means no load.
    # Two requests at a time never preempt (a preempted request may hit its own evicted prefix).
    engine = tiny_engine(loaded, cpu_kv_cache_bytes=1 << 20, max_num_seqs=2, request_buckets=(2,), **SMALL_POOL)
    calls = counting(engine.kv_connector.block_io)
    got, rows = generate(engine, prompts, tag="small")
    assert calls["scatter"] == 0 and engine.kv_connector.num_loaded_blocks == 0
    assert calls["gather"] > 0 and calls["gather"] <= engine.kv_connector.tier.num_saved_blocks
    assert all(r[0].num_computed_tokens == 0 for r in rows) and engine.scheduler.num_preemptions == 0
    ref, _ = generate(tiny_engine(loaded, max_num_seqs=2, request_buckets=(2,), **SMALL_POOL), prompts, tag="off")
    for i, (a, b) in enumerate(zip(got, ref)):
        assert_same_greedy(a.token_ids, b.token_ids, b.logprobs, f"prompt {i}")


def test_preempted_requests_reload_their_evicted_prefix(loaded):
    """Eight 20..44-token prompts on a 40-block pool preempt each other; a resumed request loads
    what was evicted meanwhile, and every output equals the tier-off engine's."""
    rng = np.random.default_rng(1)
    prompts = random_prompts(rng, 8, 20, 44, 96)
    engine = tiny_engine(loaded, cpu_kv_cache_bytes=1 << 20, **SMALL_POOL)
    got, _ = generate(engine, prompts, max_tokens=6, tag="p")
    assert engine.scheduler.num_preemptions > 0 and engine.kv_connector.num_loaded_blocks > 0
    ref, _ = generate(tiny_engine(loaded, **SMALL_POOL), prompts, max_tokens=6, tag="q")
    for i, (a, b) in enumerate(zip(got, ref)):
        assert_same_greedy(a.token_ids, b.token_ids, b.logprobs, f"prompt {i}")


def test_tier_is_lru_by_chain_hash_within_capacity():
    layout = KVLayout.of("m", 2, "float32", KVSpec.standard(num_layers=1, num_kv_heads=1, head_dim=2))
    tier = HostKVTier(3 * layout.block_bytes + 5, layout)
    blocks = {bytes([i]): np.full(layout.block_shape, i, np.float32) for i in range(4)}
    for h in itertools.islice(blocks, 3):
        tier.put(h, blocks[h])
    tier.fetch([b"\x00"])  # most recently used now: block 1 is the oldest
    tier.put(b"\x03", blocks[b"\x03"])
    assert tier.lookup([b"\x00", b"\x02", b"\x03"]) == 3 and tier.lookup([b"\x01"]) == 0
    assert tier.lookup([b"\x00", b"\x01", b"\x02"]) == 1, "lookup stops at the first miss"
    payload = tier.fetch([b"\x02", b"\x03"]).result()
    np.testing.assert_array_equal(payload.blocks[:, 0], [2, 3])
    with pytest.raises(ValueError, match="cpu_kv_cache_bytes must hold at least one block"):
        HostKVTier(layout.block_bytes - 1, layout)
    with pytest.raises(ValueError, match="cpu_kv_cache_bytes must be an integer >= 0, got -1"):
        EngineConfig(cpu_kv_cache_bytes=-1)
