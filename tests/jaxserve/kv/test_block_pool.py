"""Block pool: free list order, the null block, ref counts, lazy LRU eviction, the on_free hook."""

import pytest

from jaxserve.kv.block_pool import NULL_BLOCK_ID, Block, BlockPool, FreeBlockQueue


def test_free_queue_pop_remove_append_are_ordered():
    blocks = [Block(i) for i in range(5)]
    queue = FreeBlockQueue(blocks)
    queue.remove(blocks[2])  # from the middle
    assert [b.block_id for b in queue] == [0, 1, 3, 4]
    assert queue.popleft() is blocks[0]
    queue.append(blocks[2])
    assert [b.block_id for b in queue] == [1, 3, 4, 2]
    assert len(queue) == 4
    with pytest.raises(AssertionError):
        queue.append(blocks[3])  # already in the list


def test_null_block_is_never_handed_out():
    pool = BlockPool(4)
    assert pool.num_free_blocks == 3
    blocks = pool.get_new_blocks(3)
    assert NULL_BLOCK_ID not in [b.block_id for b in blocks]
    with pytest.raises(ValueError, match="cannot allocate"):
        pool.get_new_blocks(1)
    with pytest.raises(AssertionError):
        pool.free_blocks([pool.null_block])


def test_usage_and_double_free():
    pool = BlockPool(5)
    blocks = pool.get_new_blocks(2)
    assert pool.usage == pytest.approx(0.5)
    pool.free_blocks(blocks)
    assert pool.usage == 0.0
    with pytest.raises(AssertionError, match="double free"):
        pool.free_blocks(blocks[:1])


def test_ref_counts_keep_shared_blocks_out_of_the_free_list():
    pool = BlockPool(4)
    (block,) = pool.get_new_blocks(1)
    pool.touch([block])
    assert block.ref_cnt == 2
    pool.free_blocks([block])
    assert pool.num_free_blocks == 2
    pool.free_blocks([block])
    assert pool.num_free_blocks == 3


def test_lazy_eviction_keeps_hash_until_reallocated_deepest_first():
    freed = []
    pool = BlockPool(4, on_free=freed.extend)
    a, b, c = pool.get_new_blocks(3)
    pool.cache_block(a, b"ha")
    pool.cache_block(b, b"hb")
    pool.free_blocks([c, b, a])  # a request frees deepest first
    assert freed == [c.block_id]  # c held no hash: unreadable at once
    assert pool.get_cached_block(b"ha") is a and pool.get_cached_block(b"hb") is b
    # A hit on a free cached block takes it off the free list.
    pool.touch([a])
    assert a.ref_cnt == 1 and pool.num_free_blocks == 2
    # The free list hands out c (no hash), then b, evicting b's hash only then.
    assert pool.get_new_blocks(1) == [c]
    assert pool.get_cached_block(b"hb") is b
    assert pool.get_new_blocks(1) == [b]
    assert pool.get_cached_block(b"hb") is None and b.block_hash is None
    assert freed == [c.block_id, b.block_id]


def test_cache_block_keeps_the_first_block_for_a_hash():
    pool = BlockPool(4)
    a, b = pool.get_new_blocks(2)
    pool.cache_block(a, b"h")
    pool.cache_block(b, b"h")
    assert pool.get_cached_block(b"h") is a and b.block_hash is None


def test_caching_disabled_and_reset_prefix_cache():
    pool = BlockPool(4, enable_caching=False)
    (a,) = pool.get_new_blocks(1)
    pool.cache_block(a, b"h")
    assert pool.get_cached_block(b"h") is None

    freed = []
    pool = BlockPool(4, on_free=freed.extend)
    (a,) = pool.get_new_blocks(1)
    pool.cache_block(a, b"h")
    assert not pool.reset_prefix_cache()  # a is in use
    pool.free_blocks([a])
    assert freed == []
    assert pool.reset_prefix_cache()
    assert pool.get_cached_block(b"h") is None and freed == [a.block_id]
