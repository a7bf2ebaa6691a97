"""KV cache manager: prefix-cache hits, salts, stable hashes, forks, and invariants under random use."""

import os
import subprocess
import sys

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from jaxserve.kv.block_pool import NULL_BLOCK_ID
from jaxserve.config import cdiv
from jaxserve.kv.cache_manager import KVCacheManager, hash_block, root_hash
from jaxserve.request import Request

BLOCK = 4


def make_request(request_id, tokens, salt=None, **kwargs):
    return Request(request_id, list(tokens), max_tokens=8, cache_salt=salt, **kwargs)


def prefill(manager, request):
    """Schedule the whole known sequence at once (after any cache hit) and cache its blocks."""
    blocks, num_cached = manager.get_computed_blocks(request)
    new_ids = manager.allocate_slots(request, request.num_tokens - num_cached, blocks)
    assert new_ids is not None
    request.num_computed_tokens = request.num_tokens
    manager.cache_blocks(request, request.num_computed_tokens)
    return num_cached


def test_prefix_hit_covers_exactly_the_shared_full_blocks():
    manager = KVCacheManager(32, BLOCK, cache_seed="m")
    first = make_request("a", range(4 * BLOCK + 2))
    prefill(manager, first)
    # Shares 3 full blocks and one token of the 4th.
    second = make_request("b", list(range(3 * BLOCK + 1)) + [99] * 6)
    assert prefill(manager, second) == 3 * BLOCK
    assert manager.block_table("b")[:3] == manager.block_table("a")[:3]
    assert manager.block_table("b")[3] != manager.block_table("a")[3]
    assert (manager.prefix_cache_queries, manager.prefix_cache_hits) == (first.num_tokens + second.num_tokens, 12)


def test_prefix_hit_after_the_first_request_finished():
    manager = KVCacheManager(32, BLOCK, cache_seed="m")
    first = make_request("a", range(3 * BLOCK))
    prefill(manager, first)
    table = manager.block_table("a")
    manager.free(first)
    # The whole prompt is cached, but the last token is always recomputed.
    again = make_request("b", range(3 * BLOCK))
    assert prefill(manager, again) == 2 * BLOCK
    assert manager.block_table("b")[:2] == table[:2]


def test_cache_salt_isolates_and_bypass_flags():
    manager = KVCacheManager(32, BLOCK, cache_seed="m")
    prefill(manager, make_request("a", range(3 * BLOCK), salt="tenant-1"))
    assert prefill(manager, make_request("b", range(3 * BLOCK), salt="tenant-2")) == 0
    assert prefill(manager, make_request("c", range(3 * BLOCK))) == 0
    assert prefill(manager, make_request("d", range(3 * BLOCK), salt="tenant-1")) == 2 * BLOCK
    assert prefill(manager, make_request("e", range(3 * BLOCK), salt="tenant-1", skip_prefix_cache=True)) == 0

    disabled = KVCacheManager(32, BLOCK, enable_caching=False)
    prefill(disabled, make_request("a", range(3 * BLOCK)))
    assert prefill(disabled, make_request("b", range(3 * BLOCK))) == 0


def test_cache_seed_separates_models():
    tokens = list(range(BLOCK))
    assert hash_block(root_hash("model-a|float32|16"), tokens) != hash_block(root_hash("model-b|float32|16"), tokens)


# SHA-256 over an explicit byte layout: this value must never change between processes or releases
# (it would silently invalidate any persisted or shared cache).
EXPECTED_HASH = "0f0f24d2224f8407485ba20c91db301bd108b75f3eceee314f258c461dc2bb7a"


def test_hash_is_stable_across_processes():
    assert hash_block(root_hash("m"), [1, 2, 3, 4], "salt").hex() == EXPECTED_HASH
    code = ("from jaxserve.kv.cache_manager import hash_block, root_hash;"
            "print(hash_block(root_hash('m'), [1, 2, 3, 4], 'salt').hex())")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
    assert out.stdout.strip() == EXPECTED_HASH


def test_allocate_returns_none_and_changes_nothing_when_full():
    manager = KVCacheManager(5, BLOCK)  # 4 usable blocks
    request = make_request("a", range(3 * BLOCK))
    assert manager.allocate_slots(request, 3 * BLOCK) is not None
    request.num_computed_tokens = 3 * BLOCK
    assert manager.allocate_slots(request, 2 * BLOCK) is None
    assert len(manager.block_table("a")) == 3 and manager.num_free_blocks == 1
    assert manager.allocate_slots(request, 1, num_lookahead=BLOCK - 1) == [manager.block_table("a")[-1]]
    assert manager.usage == 1.0


def test_cache_hit_on_free_blocks_counts_against_free_space():
    manager = KVCacheManager(5, BLOCK)
    first = make_request("a", range(3 * BLOCK))
    prefill(manager, first)
    manager.free(first)  # 4 free blocks, 3 of them cached
    second = make_request("b", list(range(2 * BLOCK)) + [7] * (3 * BLOCK))
    blocks, num_cached = manager.get_computed_blocks(second)
    assert num_cached == 2 * BLOCK
    # Needs 5 blocks: 2 hits (taken off the free list) + 3 new > 4 free.
    assert manager.allocate_slots(second, 3 * BLOCK, blocks) is None
    assert manager.num_free_blocks == 4


def test_fork_shares_full_prompt_blocks_only():
    manager = KVCacheManager(32, BLOCK, enable_caching=False)
    parent = make_request("p", range(2 * BLOCK + 3))
    prefill(manager, parent)
    child = make_request("c", range(2 * BLOCK + 3))
    assert manager.fork(parent, child) == 2 * BLOCK
    assert manager.block_table("c") == manager.block_table("p")[:2]
    assert manager.allocate_slots(child, 3) is not None
    assert manager.block_table("c")[2] != manager.block_table("p")[2]
    # A block-aligned prompt leaves its last block to the child: the last token is recomputed.
    aligned_parent = make_request("p2", range(2 * BLOCK))
    prefill(manager, aligned_parent)
    assert manager.fork(aligned_parent, make_request("c2", range(2 * BLOCK))) == BLOCK


class KVCacheMachine(RuleBasedStateMachine):
    """Random allocate / append / fork / free / evict sequences over a small pool."""

    def __init__(self):
        super().__init__()
        self.freed = []
        self.manager = KVCacheManager(24, BLOCK, cache_seed="test", on_free=self.freed.extend)
        self.live: dict[str, Request] = {}
        self.next_id = 0
        # Prompts drawn from a few shared prefixes, so prefix hits happen often.
        self.prefixes = [[1] * 20, list(range(20)), [5, 6] * 10]

    def _new_id(self):
        self.next_id += 1
        return f"r{self.next_id}"

    @rule(prefix=st.integers(0, 2), keep=st.integers(1, 20), tail=st.lists(st.integers(0, 50), max_size=6),
          salt=st.sampled_from([None, "s"]), chunk=st.integers(1, 30))
    def allocate(self, prefix, keep, tail, salt, chunk):
        request = make_request(self._new_id(), self.prefixes[prefix][:keep] + tail, salt)
        blocks, num_cached = self.manager.get_computed_blocks(request)
        num_new = min(chunk, request.num_tokens - num_cached)
        if self.manager.allocate_slots(request, num_new, blocks) is None:
            assert self.manager.block_table(request.request_id) == []
            return
        request.num_computed_tokens = num_cached + num_new
        self.manager.cache_blocks(request, request.num_computed_tokens)
        self.live[request.request_id] = request

    @precondition(lambda self: self.live)
    @rule(data=st.data(), token=st.integers(0, 50), chunk=st.integers(1, 10))
    def append(self, data, token, chunk):
        """Continue a prefill chunk, or sample one token and compute it; preempt if out of blocks."""
        request = self.live[data.draw(st.sampled_from(sorted(self.live)))]
        if request.num_computed_tokens == request.num_tokens:
            request.output_token_ids.append(token)
        num_new = min(chunk, request.num_tokens - request.num_computed_tokens)
        if self.manager.allocate_slots(request, num_new) is None:
            self.manager.free(self.live.pop(request.request_id))
            return
        request.num_computed_tokens += num_new
        self.manager.cache_blocks(request, request.num_computed_tokens)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def fork(self, data):
        parent = self.live[data.draw(st.sampled_from(sorted(self.live)))]
        child = make_request(self._new_id(), parent.prompt_token_ids, parent.cache_salt)
        shared = self.manager.fork(parent, child)
        assert shared % BLOCK == 0 and shared < child.num_prompt_tokens
        self.live[child.request_id] = child

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        request = self.live.pop(data.draw(st.sampled_from(sorted(self.live))))
        self.manager.free(request)
        assert self.manager.block_table(request.request_id) == []

    @rule()
    def evict(self):
        """Take every free block (evicting all cached ones), then give them back."""
        pool = self.manager.block_pool
        blocks = pool.get_new_blocks(pool.num_free_blocks)
        assert all(b.block_hash is None for b in blocks)
        pool.free_blocks(blocks)
        if not self.live:
            assert pool.reset_prefix_cache() and not pool.cached_blocks

    @invariant()
    def no_leak_and_ref_counts_match_owners(self):
        pool = self.manager.block_pool
        owners: dict[int, list[tuple[Request, int]]] = {}
        for request in self.live.values():
            table = self.manager.block_table(request.request_id)
            assert NULL_BLOCK_ID not in table
            assert len(set(table)) == len(table)
            assert len(table) >= cdiv(request.num_computed_tokens, BLOCK)
            for index, block_id in enumerate(table):
                owners.setdefault(block_id, []).append((request, index))
        assert set(self.manager.req_to_blocks) == set(self.live)
        for block in pool.blocks[1:]:
            assert block.ref_cnt == len(owners.get(block.block_id, [])), block
        free_ids = [b.block_id for b in pool.free_queue]
        assert len(free_ids) == len(set(free_ids)) == pool.num_free_blocks
        assert set(free_ids) == {b.block_id for b in pool.blocks[1:] if b.ref_cnt == 0}
        assert pool.num_free_blocks + len(owners) == pool.num_blocks - 1
        assert pool.null_block.ref_cnt == 1
        assert NULL_BLOCK_ID not in self.freed

    @invariant()
    def shared_blocks_are_equal_prefix_blocks(self):
        owners: dict[int, list[tuple[Request, int]]] = {}
        for request in self.live.values():
            for index, block_id in enumerate(self.manager.block_table(request.request_id)):
                owners.setdefault(block_id, []).append((request, index))
        for block_id, holders in owners.items():
            if len(holders) < 2:
                continue
            (first, index), *others = holders
            end = (index + 1) * BLOCK
            assert len(first.token_ids(0, end)) == end, "a shared block must be full"
            for other, other_index in others:
                assert other_index == index
                assert other.token_ids(0, end) == first.token_ids(0, end)
                assert other.cache_salt == first.cache_salt

    @invariant()
    def cache_map_is_consistent(self):
        for block_hash, block in self.manager.block_pool.cached_blocks.items():
            assert block.block_hash == block_hash and block.block_id != NULL_BLOCK_ID


TestKVCacheMachine = KVCacheMachine.TestCase
TestKVCacheMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
