"""KV groups for sliding-window layers (jaxserve/kv/cache_manager.py): a sliding group gives back
the blocks its window left while the request runs, full-attention layers keep every block;
prefix hits, forks and preemption stay correct; the pools never leak or double-free
(hypothesis); through the engine, a long request's sliding layers hold at most
ceil(W / B) + 1 blocks at every step and greedy outputs under a tight budget equal an
unconstrained run and the one-group engine."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxserve.config import cdiv
from jaxserve.kv.cache_manager import KVCacheManager
from jaxserve.request import Request
from jaxserve.sampling_params import SamplingParams
from models.config import ModelConfig
from tests.engine_utils import tiny_engine, tiny_loaded_model

W, B = 128, 16  # window and block size of the long-request checks


def request(tokens, request_id="r", max_tokens=4096) -> Request:
    return Request(request_id, list(tokens), max_tokens)


def sliding_bound(window: int, block: int, num_new: int) -> int:
    """Blocks a sliding group needs for a row computing `num_new` tokens: ceil((W - 1 + n) / B) + 1."""
    return cdiv(window - 1 + num_new, block) + 1


def run_tokens(manager: KVCacheManager, req: Request, steps) -> list[tuple[int, ...]]:
    """Allocate and 'compute' `steps` (tokens per step) for `req`; -> held blocks per group after each step."""
    held = []
    for num_new in steps:
        assert manager.allocate_slots(req, num_new) is not None
        req.num_computed_tokens += num_new
        manager.cache_blocks(req, req.num_computed_tokens)
        held.append(manager.num_held_blocks(req.request_id))
    return held


# ---- the manager ----

def test_decoding_holds_only_the_window():
    """2,000 positions one at a time: the sliding group never holds more than ceil(W/B) + 1 blocks,
    the full group every block; the table keeps block numbers (null before the window)."""
    manager = KVCacheManager([200, 200], B, windows=(None, W))
    req = request(range(2, 2002))
    held = run_tokens(manager, req, [1] * 2000)
    assert max(h[1] for h in held) == cdiv(W, B) + 1
    assert [h[0] for h in held] == [cdiv(n, B) for n in range(1, 2001)]
    full, sliding = manager.block_tables("r")
    assert len(sliding) == len(full) == 125
    first = (2000 - W) // B  # the next position (2000) reads keys from 2000 - W + 1 on
    assert sliding[:first] == [0] * first and all(sliding[first:])
    assert manager.block_pools[1].num_free_blocks == 199 - (125 - first)


@pytest.mark.parametrize("chunk", [16, 64, 100])
def test_chunked_prefill_holds_window_plus_chunk(chunk):
    manager = KVCacheManager([200, 200], B, windows=(None, W))
    req = request(range(2, 2002))
    steps = [chunk] * (2000 // chunk) + [2000 % chunk] * bool(2000 % chunk)
    held = run_tokens(manager, req, steps)
    assert max(h[1] for h in held) <= sliding_bound(W, B, chunk)
    if chunk == B:  # block-aligned chunks of one block hold the decoding bound
        assert max(h[1] for h in held) == cdiv(W, B) + 1


def test_allocation_counts_only_the_window():
    """A sliding pool just large enough for one window serves a 2,000-token request; the full pool
    refuses it once it runs out, allocating nothing (the sliding block the window left is given
    back all the same: it is never read again)."""
    manager = KVCacheManager([60, sliding_bound(W, B, 1) + 1], B, windows=(None, W))
    req = request(range(2, 2002))
    run_tokens(manager, req, [1] * (59 * B))
    assert manager.allocate_slots(req, 1) is None
    assert manager.num_held_blocks("r") == (59, cdiv(W, B))
    assert len(manager.block_tables("r")[1]) == 59


def test_prefix_hit_needs_the_window_before_it():
    """A hit covers full blocks 0..k-1 in the full group but only the window's blocks in the
    sliding group; when a window block was evicted the hit falls back to a shorter prefix whose
    window is intact."""
    manager = KVCacheManager([100, 100], B, windows=(None, 32))
    prompt = list(range(2, 2 + 10 * B + 1))
    first = request(prompt, "a")
    run_tokens(manager, first, [len(prompt)])
    manager.free(first)
    again = request(prompt, "b")
    blocks, num_tokens = manager.get_computed_blocks(again)
    assert num_tokens == 10 * B and len(blocks) == 10
    assert manager.allocate_slots(again, 1, blocks) is not None
    full, sliding = manager.block_tables("b")
    # Position 160 reads keys from 129 on: blocks 8 and 9 only.
    assert sliding[:8] == [0] * 8 and all(sliding[8:])
    manager.free(again)

    # Evict the sliding group's block 9 (its hash leaves the cache): the hit ends where a window is whole.
    pool = manager.block_pools[1]
    evicted = pool.get_cached_block(manager.block_hashes(again)[9])
    pool.free_queue.remove(evicted)
    pool._evict(evicted)
    pool.free_queue.append(evicted)
    third = request(prompt, "c")
    blocks, num_tokens = manager.get_computed_blocks(third)
    assert num_tokens == 9 * B  # block 9 is recomputed; position 144 reads blocks 7 and 8, both cached
    assert manager.allocate_slots(third, len(prompt) - num_tokens, blocks) is not None


def test_sliding_only_model_hits_on_the_window_alone():
    """A model whose every layer slides (Mistral-style): one sliding group; a hit needs no block
    before the window."""
    manager = KVCacheManager(40, B, windows=(32,))
    prompt = list(range(2, 2 + 20 * B + 1))
    first = request(prompt, "a")
    held = run_tokens(manager, first, [B] * 20 + [1])
    assert max(h[0] for h in held) <= sliding_bound(32, B, B)
    manager.free(first)
    blocks, num_tokens = manager.get_computed_blocks(request(prompt, "b"))
    assert num_tokens == 20 * B and sum(b.block_id != 0 for b in blocks) == 2


def test_fork_shares_the_window():
    manager = KVCacheManager([100, 100], B, windows=(None, 32))
    prompt = list(range(2, 2 + 6 * B + 5))
    parent = request(prompt, "p")
    run_tokens(manager, parent, [len(prompt)])
    child = request(prompt, "c")
    assert manager.fork(parent, child) == 6 * B
    assert manager.block_tables("c")[0] == manager.block_tables("p")[0][:6]
    sliding = manager.block_tables("c")[1]
    assert sliding[:4] == [0] * 4 and sliding[4:6] == manager.block_tables("p")[1][4:6]
    manager.free(parent)
    manager.free(child)
    assert all(pool.num_free_blocks == 99 for pool in manager.block_pools)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "step", "free", "preempt", "fork"]), st.integers(0, 7),
                          st.integers(1, 40)), min_size=1, max_size=60),
       st.sampled_from([(None, 8), (8,), (None, 4, 12)]))
def test_no_leak_no_double_free(ops, windows):
    """Random requests with random chunk sizes, forks, preemptions and frees over tight pools:
    every live block's ref count equals the tables holding it, no table names a freed block, and
    once every request is gone every pool is free again (BlockPool asserts on a double free)."""
    block = 4
    manager = KVCacheManager([24] * len(windows), block, windows=windows)
    live: dict[str, Request] = {}
    count = 0
    for op, pick, size in ops:
        names = sorted(live)
        if op == "add" or not names:
            count += 1
            prompt = [2 + (pick * 7 + i) % 5 for i in range(size)]  # few distinct prompts: prefix hits
            req = request(prompt, f"r{count}")
            blocks, hit = manager.get_computed_blocks(req)
            if manager.allocate_slots(req, max(1, min(size, req.num_tokens - hit) // 2), blocks) is not None:
                req.num_computed_tokens = hit + max(1, min(size, req.num_tokens - hit) // 2)
                manager.cache_blocks(req, req.num_computed_tokens)
                live[req.request_id] = req
            else:
                manager.free(req)
            continue
        req = live[names[pick % len(names)]]
        if op == "step":
            num_new = min(size, 60 - req.num_computed_tokens)
            if num_new > 0 and manager.allocate_slots(req, num_new) is not None:
                req.num_computed_tokens += num_new
                req.prompt_token_ids.extend([2] * max(0, req.num_computed_tokens - req.num_tokens))
                manager.cache_blocks(req, req.num_computed_tokens)
        elif op == "fork" and req.num_computed_tokens > 1:
            count += 1
            child = request(req.prompt_token_ids, f"r{count}")
            child.num_computed_tokens = 0
            manager.fork(req, child)
            live[child.request_id] = child
        elif op in ("free", "preempt"):
            manager.free(req)
            if op == "free":
                del live[req.request_id]
            else:
                req.num_computed_tokens = 0
        check_ref_counts(manager)
    for req in live.values():
        manager.free(req)
    for pool in manager.block_pools:
        assert pool.num_free_blocks == pool.num_blocks - 1
        assert all(b.ref_cnt == 0 for b in pool.blocks[1:])


def check_ref_counts(manager: KVCacheManager) -> None:
    for pool, tables in zip(manager.block_pools, manager.tables):
        holders = np.zeros(pool.num_blocks, int)
        for blocks in tables.values():
            for b in blocks:
                if b is not pool.null_block:
                    holders[b.block_id] += 1
        assert [b.ref_cnt for b in pool.blocks[1:]] == holders[1:].tolist()


# ---- through the engine ----

def tiny_sliding_config(window: int, layer_types=("sliding_attention", "full_attention")) -> ModelConfig:
    hf = dict(architectures=["GptOssForCausalLM"], vocab_size=96, hidden_size=32, intermediate_size=32,
              num_hidden_layers=len(layer_types), num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=4096, sliding_window=window,
              layer_types=list(layer_types), attention_bias=True, eos_token_id=1, rms_norm_eps=1e-5,
              rope_theta=10000.0)
    return ModelConfig.from_hf(hf)


@pytest.fixture(scope="module")
def long_model():
    return tiny_loaded_model(tiny_sliding_config(W))


@pytest.mark.parametrize("chunk", [16, 64])
def test_long_request_holds_the_window_at_every_step(long_model, chunk):
    """A 2,000-token request (1,984 prompt tokens, 16 generated) with window 128 and block 16: at
    every step the scheduler's sliding group and the device table the step read hold at most
    ceil(W / B) + chunk / B blocks (block-aligned chunks of positions p..p+C-1 read keys from
    p - W + 1 on): ceil(W / B) + 1 = 9 for one-block chunks and while decoding."""
    engine = tiny_engine(long_model, block_size=B, max_num_batched_tokens=chunk, token_buckets=(chunk,),
                         max_model_len=2048, kv_cache_memory_bytes=4 << 20, poison_freed_blocks=True)
    assert engine.kv_plan.group_windows == (None, W)
    engine.add_request("long", {"prompt_token_ids": np.random.default_rng(0).integers(2, 96, 1984).tolist()},
                       SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    bound = cdiv(W, B) + chunk // B
    steps, output, most = 0, None, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            output = out
        steps += 1
        held = engine.kv_manager.num_held_blocks("long")
        assert held[1] <= bound, (steps, held)
        most = max(most, held[1])
        table = np.asarray(engine.runner.block_tables[engine.runner.num_slots])  # group 1, slot 0
        assert np.count_nonzero(table) <= bound, (steps, np.count_nonzero(table))
    assert most == bound and (chunk != B or bound == cdiv(W, B) + 1)
    assert steps >= 2000 // chunk and len(output.outputs[0].token_ids) == 16


def test_tight_budget_greedy_equals_unconstrained():
    """Mixed sliding (window 8) and full layers, block 4: 12 requests over a budget that forces
    preemptions give the greedy tokens of a roomy run and of the one-group engine; the hybrid plan
    holds more full-attention blocks than one group in the same budget."""
    loaded = tiny_loaded_model(tiny_sliding_config(8, ("sliding_attention", "full_attention", "sliding_attention")))
    rng = np.random.default_rng(1)
    prompts = [rng.integers(2, 96, int(n)).tolist() for n in rng.integers(5, 40, 12)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)

    def run(**options):
        engine = tiny_engine(loaded, max_model_len=96, poison_freed_blocks=True, max_num_seqs=4,
                             max_num_batched_tokens=16, **options)
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
        outputs = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    outputs[out.request_id] = out.outputs[0].token_ids
        return engine, [outputs[str(i)] for i in range(len(prompts))]

    per_token = 3 * 2 * 2 * 8 * 4  # layers, K and V, KV heads, head_dim, f32
    roomy, expected = run()
    tight, got = run(kv_cache_memory_bytes=30 * 4 * per_token)
    single, got_single = run(kv_cache_memory_bytes=30 * 4 * per_token, disable_hybrid_kv_cache_manager=True)
    assert tight.kv_plan.group_windows == (None, 8) and single.kv_plan.group_windows == (None,)
    # One group: 30 blocks of 3 layers. Groups: the window layers' pool holds 4 rows of
    # ceil(7 / 4) + 3 blocks and a step's 4 blocks plus the null one (25); the full layer gets the rest.
    assert single.kv_plan.num_blocks == 30 and tight.kv_plan.group_blocks == (40, 25)
    assert tight.metrics.num_preemptions > 0 and single.metrics.num_preemptions > 0
    assert got == expected and got_single == expected
    assert roomy.kv_plan.group_windows == (None, 8)


def test_prefix_hits_and_forks_through_the_engine(long_model):
    """Repeated long prompts hit the prefix cache through the window rule, n = 3 forks share it,
    and every output equals the cold run's."""
    rng = np.random.default_rng(2)
    prompt = rng.integers(2, 96, 700).tolist()
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)

    def generate(engine, request_id, sampling):
        engine.add_request(request_id, {"prompt_token_ids": prompt}, sampling)
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done = out
        return done

    cold = generate(tiny_engine(long_model, block_size=B, max_num_batched_tokens=128, token_buckets=(128,),
                                max_model_len=1024, enable_prefix_caching=False), "cold", params)
    engine = tiny_engine(long_model, block_size=B, max_num_batched_tokens=128, token_buckets=(128,),
                         max_model_len=1024, poison_freed_blocks=True)
    first = generate(engine, "a", params)
    hits = engine.kv_manager.prefix_cache_hits
    second = generate(engine, "b", params)
    assert engine.kv_manager.prefix_cache_hits - hits == (len(prompt) - 1) // B * B
    forked = generate(engine, "c", SamplingParams(n=3, max_tokens=8, temperature=0, ignore_eos=True))
    expected = cold.outputs[0].token_ids
    assert first.outputs[0].token_ids == second.outputs[0].token_ids == expected
    assert [o.token_ids for o in forked.outputs] == [expected] * 3


def test_sizing_gives_sliding_groups_their_window_and_full_layers_the_rest():
    """gpt-oss-20b's KV spec (12 full, 12 window-128 layers) in a 2 GiB budget: the window group
    gets exactly what max_num_seqs decoding rows and one step's tokens can hold, the full group
    the rest, so `max_model_len="auto"` sees twice the one-group tokens less the window pool."""
    from jaxserve.config import EngineConfig
    from jaxserve.kv.sizing import plan_kv_cache
    from tests.models.test_gpt_oss import gpt_oss_20b_config

    model = ModelConfig.from_hf(gpt_oss_20b_config())
    config = EngineConfig(model="tiny", max_model_len="auto", kv_cache_memory_bytes=2 << 30, max_num_seqs=64,
                          max_num_batched_tokens=2048, max_num_reqs=4096)
    plan = plan_kv_cache(config, model, np.dtype("float16"), (None, 128))
    single = plan_kv_cache(config, model, np.dtype("float16"))
    per_layer_block = 16 * 2 * 8 * 64 * 2  # tokens, K and V, KV heads, head_dim, bytes
    assert plan.group_bytes_per_block == (12 * per_layer_block, 12 * per_layer_block)
    assert plan.layer_groups == (1, 0) * 12
    window_blocks = 64 * (cdiv(127, 16) + 3) + cdiv(2048, 16) + 1
    assert plan.group_blocks[1] == window_blocks
    assert plan.group_blocks[0] == ((2 << 30) - window_blocks * 12 * per_layer_block) // (12 * per_layer_block)
    assert sum(n * b for n, b in zip(plan.group_blocks, plan.group_bytes_per_block)) <= 2 << 30
    assert plan.max_model_len == min(model.max_position_embeddings, (plan.group_blocks[0] - 1) * 16)
    # Half the bytes per block: the two pools hold twice the one-group blocks between them.
    assert sum(plan.group_blocks) == (2 << 30) // (12 * per_layer_block) == 2 * single.num_blocks + 1


def test_sizing_shares_the_budget_when_windows_are_wide():
    """A window of 4,096 keys for 256 rows would take more than the budget: the sliding pool gets
    the blocks one group would have (here half the budget), never less than one request's longest
    step, and the full group no fewer."""
    from jaxserve.config import EngineConfig
    from jaxserve.kv.sizing import plan_kv_cache

    model = tiny_sliding_config(4096)
    config = EngineConfig(model="tiny", max_model_len=4096, kv_cache_memory_bytes=8 << 20, max_num_seqs=256,
                          max_num_batched_tokens=512)
    plan = plan_kv_cache(config, model, np.dtype("float32"), (None, 4096))
    per_block = 16 * 2 * 2 * 8 * 4
    assert plan.group_bytes_per_block == (per_block, per_block)
    one_group = (8 << 20) // (2 * per_block)
    assert plan.group_blocks[1] == one_group and one_group > cdiv(4095 + 512, 16) + 2
    assert plan.group_blocks[0] == one_group


def test_sliding_only_model_matches_transformers_and_one_group():
    """Mistral-style (every layer a window of 8, one sliding group): prompt logprobs within 1e-4
    of transformers through chunked prefill, greedy tokens equal to the one-group engine's, and
    equal again on prefix-cache hits that need only the window."""
    from tests.models.served import engine, fixture, log_softmax, prompts_of

    loaded, ref = fixture("mistral")
    prompts = [{"prompt_token_ids": p} for p in prompts_of(ref)]
    params = dict(max_tokens=16, temperature=0, ignore_eos=True)
    hybrid, single = engine(loaded, poison_freed_blocks=True), engine(loaded, disable_hybrid_kv_cache_manager=True)
    assert hybrid.engine.kv_plan.group_windows == (8,) and single.engine.kv_plan.group_windows == (None,)
    scored = hybrid.generate(prompts, SamplingParams(**params, prompt_logprobs=1), use_tqdm=False)
    for i, out in enumerate(scored):
        expected = log_softmax(ref[f"logits_{i}"])
        worst = max(abs(lp.logprob - expected[pos - 1, token])
                    for pos, entry in enumerate(out.prompt_logprobs[1:], start=1) for token, lp in entry.items())
        assert worst < 1e-4, (i, worst)
    reference = [o.outputs[0].token_ids for o in single.generate(prompts, SamplingParams(**params), use_tqdm=False)]
    assert [o.outputs[0].token_ids for o in scored] == reference
    hits = hybrid.engine.kv_manager.prefix_cache_hits
    again = hybrid.generate(prompts, SamplingParams(**params), use_tqdm=False)
    assert hybrid.engine.kv_manager.prefix_cache_hits > hits
    assert [o.outputs[0].token_ids for o in again] == reference


def test_dp_shards_keep_groups_per_shard():
    """Data-parallel attention: each dp shard has its own pool per KV group; a long request on
    one shard holds only its window there, the other shard nothing; usage is the fullest group's."""
    from jaxserve.kv.sharded_cache_manager import ShardedKVCacheManager

    manager = ShardedKVCacheManager(2, [200, 12], B, windows=(None, W))
    req = request(range(2, 1002))
    blocks, _ = manager.get_computed_blocks(req)
    assert manager.allocate_slots(req, 1, blocks) is not None
    req.num_computed_tokens = 1
    held = run_tokens(manager, req, [1] * 999)
    assert max(h[1] for h in held) == cdiv(W, B) + 1 and held[-1][0] == cdiv(1000, B)
    shard = manager.shard_of("r")
    assert manager.shards[1 - shard].num_held_blocks("r") == (0, 0)
    full, sliding = manager.block_tables("r")
    assert full == manager.shards[shard].block_tables("r")[0] and sliding.count(0) == len(sliding) - (cdiv(W, B) + 1)
    assert manager.usage == pytest.approx(max(63 / 398, 9 / 22))
    manager.free(req)
    assert all(pool.num_free_blocks == pool.num_blocks - 1 for m in manager.shards for pool in m.block_pools)


def test_lookups_leave_nothing_behind():
    """A prefix lookup keeps the other groups' hit blocks until the request is allocated or freed,
    on every dp shard that was asked (no per-request state outlives the request)."""
    from jaxserve.kv.sharded_cache_manager import ShardedKVCacheManager

    manager = ShardedKVCacheManager(2, [60, 30], B, windows=(None, 32))
    prompt = list(range(2, 2 + 4 * B + 1))
    first = request(prompt, "a")
    blocks, _ = manager.get_computed_blocks(first)
    assert manager.allocate_slots(first, len(prompt), blocks) is not None
    first.num_computed_tokens = len(prompt)
    manager.cache_blocks(first, len(prompt))
    for name in ("b", "c"):
        other = request(prompt, name)
        blocks, hit = manager.get_computed_blocks(other)
        assert hit == 4 * B
        if name == "b":
            assert manager.allocate_slots(other, 1, blocks) is not None
        manager.free(other)
    manager.free(first)
    assert all(not shard._hits for shard in manager.shards)
    assert all(not table for shard in manager.shards for table in shard.tables)
