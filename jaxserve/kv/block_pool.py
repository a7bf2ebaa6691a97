"""The KV block pool: every block exists from start-up; a free list, ref counts, a prefix-cache map.

Block 0 is the null block: padding tokens write there and nothing reads it, so it is never handed
out. The free list is a doubly linked list threaded through the blocks themselves, so popping the
head, appending at the tail and unlinking a block from the middle (a prefix-cache hit on a free
block) are all O(1).

Eviction is lazy LRU (vLLM's prefix caching design): a freed block keeps its hash and stays in the
cache map until the free list hands it out again. Callers free a request's blocks in reverse order,
so its deepest blocks, the least likely to be shared, sit nearer the head and are evicted first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

NULL_BLOCK_ID = 0


class Block:
    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev", "next")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: bytes | None = None  # set while the block is in the prefix cache
        self.prev: Block | None = None  # free-list links; None when not in the free list
        self.next: Block | None = None

    def __repr__(self) -> str:
        cached = "" if self.block_hash is None else f", hash={self.block_hash.hex()[:8]}"
        return f"Block({self.block_id}, ref_cnt={self.ref_cnt}{cached})"


class FreeBlockQueue:
    """Doubly linked list of free blocks between two sentinels: head = next to hand out."""

    def __init__(self, blocks: Iterable[Block]):
        self._head = Block(-1)
        self._tail = Block(-1)
        self._head.next, self._tail.prev = self._tail, self._head
        self._len = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Block]:
        block = self._head.next
        while block is not self._tail:
            yield block
            block = block.next

    def popleft(self) -> Block:
        if self._len == 0:
            raise IndexError("no free blocks")
        block = self._head.next
        self.remove(block)
        return block

    def remove(self, block: Block) -> None:
        assert block.prev is not None and block.next is not None, f"{block} is not in the free list"
        block.prev.next, block.next.prev = block.next, block.prev
        block.prev = block.next = None
        self._len -= 1

    def append(self, block: Block) -> None:
        assert block.prev is None and block.next is None, f"{block} is already in the free list"
        last = self._tail.prev
        last.next, block.prev = block, last
        block.next, self._tail.prev = self._tail, block
        self._len += 1


class BlockPool:
    """`num_blocks` blocks (the null block included), their ref counts and the prefix-cache map.

    `on_free(block_ids)` is a debug hook (the model runner poisons those blocks with NaN): it is
    called with the blocks whose contents nobody may read any more, that is a block freed without
    a hash, or a cached block at the moment it is evicted. A freed block that keeps its hash is not
    reported: a later prefix-cache hit still reads it.

    `on_evict(block_ids, block_hashes)` (a KV connector's host tier) is called with the cached
    blocks `get_new_blocks` evicts, before `on_free` and before the caller can write them.
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True,
                 on_free: Callable[[list[int]], None] | None = None):
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.on_free = on_free
        self.on_evict: Callable[[list[int], list[bytes]], None] | None = None
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.null_block = self.blocks[NULL_BLOCK_ID]
        self.null_block.ref_cnt = 1  # held forever, so it is never freed or handed out
        self.free_queue = FreeBlockQueue(self.blocks[1:])
        self.cached_blocks: dict[bytes, Block] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out, cached-but-unused ones included."""
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of the usable blocks (all but the null block) held by some request."""
        return 1.0 - self.num_free_blocks / (self.num_blocks - 1)

    def get_new_blocks(self, num_blocks: int) -> list[Block]:
        """Take `num_blocks` blocks from the head of the free list, evicting their old hashes."""
        if num_blocks > self.num_free_blocks:
            raise ValueError(f"cannot allocate {num_blocks} blocks, {self.num_free_blocks} free")
        blocks = [self.free_queue.popleft() for _ in range(num_blocks)]
        if self.on_evict:
            cached = [b for b in blocks if b.block_hash is not None]
            if cached:
                self.on_evict([b.block_id for b in cached], [b.block_hash for b in cached])
        evicted = [b.block_id for b in blocks if self._evict(b)]
        for block in blocks:
            assert block.ref_cnt == 0, block
            block.ref_cnt = 1
        if evicted and self.on_free:
            self.on_free(evicted)
        return blocks

    def get_cached_block(self, block_hash: bytes) -> Block | None:
        return self.cached_blocks.get(block_hash)

    def touch(self, blocks: Iterable[Block]) -> None:
        """Take one more reference on each block (a prefix-cache hit or a fork)."""
        for block in blocks:
            assert block is not self.null_block, "the null block is never shared"
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def cache_block(self, block: Block, block_hash: bytes) -> None:
        """Register a full, computed block under its hash (kept: an equal block cached earlier)."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash not in self.cached_blocks:
            block.block_hash = block_hash
            self.cached_blocks[block_hash] = block

    def free_blocks(self, blocks: Iterable[Block]) -> None:
        """Drop one reference on each block; pass them in eviction order (deepest first)."""
        unreadable = []
        for block in blocks:
            assert block is not self.null_block, "the null block is never freed"
            assert block.ref_cnt > 0, f"double free of {block}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)
                if block.block_hash is None:
                    unreadable.append(block.block_id)
        if unreadable and self.on_free:
            self.on_free(unreadable)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; refused (False) while any block is in use, as in vLLM."""
        if self.num_free_blocks != self.num_blocks - 1:
            return False
        evicted = [b.block_id for b in list(self.cached_blocks.values()) if self._evict(b)]
        if evicted and self.on_free:
            self.on_free(evicted)
        return True

    def _evict(self, block: Block) -> bool:
        if block.block_hash is None:
            return False
        del self.cached_blocks[block.block_hash]
        block.block_hash = None
        return True
