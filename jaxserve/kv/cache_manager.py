"""Per-request block tables over the block pool, with prefix caching by a hash chain.

Block hashes. Block i of a request (its tokens [i*B, (i+1)*B), B = block_size) is hashed only once
it is full of known tokens:

    hash_i  = SHA-256(hash_{i-1} || "T" || u64(B) || B x i64(token id) || "X" || u64(len(salt)) || salt)
    hash_-1 = SHA-256("jaxserve-kv-cache-root\0" || cache_seed)

(integers little-endian, strings UTF-8, salt empty unless i == 0).

`cache_seed` names everything that makes KV of equal tokens differ (model, KV dtype, block size);
the extra key `cache_salt` enters only block 0, and the chain carries it into every later block,
so requests with different salts share nothing. The serialization is explicit bytes, never
Python's `hash()`, so hashes are equal across processes and hosts.

A block enters the cache map through `cache_blocks`, which the scheduler calls once a step's
schedule is final (a request preempted within the step must not leave hashes behind) and again
when sampled token ids arrive: the block's last token is then computed by a scheduled step (steps
run in order, so any later reader sees it written) and all its token ids are known on the host.
Blocks cached by a step are therefore first hit by a later step, never by the same one.
`skip_prefix_cache` (prompt-logprob requests) bypasses lookups only: such a request still fills
the cache for others.

Forks (`n > 1`). A child shares the parent's full prompt blocks, never the last partial one: the
tail of the prompt, from 1 to B tokens, is recomputed by each child into a block of its own. Full
blocks are immutable, so sharing them needs no copy-on-write; recomputing the tail costs at most
B tokens per child and gives each child the last prompt position's logits to sample its own first
token from, exactly like a prefix-cache hit (which also never covers the last prompt token).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence

from jaxserve.kv.block_pool import Block, BlockPool
from jaxserve.config import cdiv
from jaxserve.request import Request


def root_hash(cache_seed: str) -> bytes:
    return hashlib.sha256(b"jaxserve-kv-cache-root\0" + cache_seed.encode()).digest()


def hash_block(parent_hash: bytes, token_ids: Sequence[int], cache_salt: str | None = None) -> bytes:
    """The chain hash of one full block (see the module docstring for the byte layout)."""
    salt = b"" if cache_salt is None else cache_salt.encode()
    data = b"".join((
        parent_hash,
        b"T", struct.pack("<Q", len(token_ids)), struct.pack(f"<{len(token_ids)}q", *token_ids),
        b"X", struct.pack("<Q", len(salt)), salt,
    ))
    return hashlib.sha256(data).digest()


class KVCacheManager:
    """Block tables of the live requests, allocated from one `BlockPool`."""

    def __init__(self, num_blocks: int, block_size: int, cache_seed: str = "", enable_caching: bool = True,
                 on_free: Callable[[list[int]], None] | None = None):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.root_hash = root_hash(cache_seed)
        self.block_pool = BlockPool(num_blocks, enable_caching, on_free)
        self.req_to_blocks: dict[str, list[Block]] = {}
        self.prefix_cache_queries = 0  # tokens looked up
        self.prefix_cache_hits = 0  # tokens found

    @property
    def usage(self) -> float:
        return self.block_pool.usage

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    def block_table(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, ())]

    # One pool is the one-shard case of `ShardedKVCacheManager` (data-parallel attention): the
    # scheduler reads shards the same way from both.
    num_shards = 1

    def shard_of(self, request_id: str) -> int:
        return 0

    def placement(self, request_id: str) -> int:
        return 0

    def same_pool(self, a: Request, b: Request) -> bool:
        return True

    def get_computed_blocks(self, request: Request, room: Sequence[int] | None = None) -> tuple[list[Block], int]:
        """The longest cached prefix of full blocks, and how many tokens it covers (`room`: the
        shards' free budgets, unused with one pool).

        Never the whole sequence: the last known token is always recomputed, so its logits exist.
        The blocks are not taken yet; pass them to `allocate_slots`.
        """
        if not self.enable_caching or request.skip_prefix_cache:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hashes = self.block_hashes(request)
        blocks = []
        for block_hash in hashes[:max_blocks]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            blocks.append(block)
        num_tokens = len(blocks) * self.block_size
        self.prefix_cache_queries += request.num_tokens
        self.prefix_cache_hits += num_tokens
        return blocks, num_tokens

    def allocate_slots(self, request: Request, num_new_tokens: int, computed_blocks: Sequence[Block] = (),
                       num_lookahead: int = 0) -> list[int] | None:
        """Give `request` room for `num_new_tokens` more tokens (plus `num_lookahead` spare slots).

        `computed_blocks` (from `get_computed_blocks`, for a request holding no blocks yet) are
        prepended to its table and count as computed on top of `request.num_computed_tokens`. Returns the ids appended to the
        table, computed blocks first, or None, changing nothing, when too few blocks are free.
        Nothing is cached here: see `cache_blocks`.
        """
        blocks = self.req_to_blocks.get(request.request_id, [])
        assert not computed_blocks or not blocks, "cache hits only for a request holding no blocks"
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        num_required = cdiv(num_computed + num_new_tokens + num_lookahead, self.block_size)
        num_to_allocate = max(0, num_required - len(blocks) - len(computed_blocks))
        # A cache hit on a free block takes it off the free list, too.
        num_hit_free = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if num_to_allocate + num_hit_free > self.block_pool.num_free_blocks:
            return None
        self.block_pool.touch(computed_blocks)
        new_blocks = list(computed_blocks) + self.block_pool.get_new_blocks(num_to_allocate)
        self.req_to_blocks.setdefault(request.request_id, blocks).extend(new_blocks)
        return [b.block_id for b in new_blocks]

    def cache_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Register the request's blocks that are full of computed, known tokens."""
        if not self.enable_caching:
            return
        blocks = self.req_to_blocks.get(request.request_id, [])
        num_full = min(num_computed_tokens, request.num_tokens) // self.block_size
        hashes = self.block_hashes(request)
        for block, block_hash in zip(blocks[:num_full], hashes[:num_full]):
            self.block_pool.cache_block(block, block_hash)

    def block_hashes(self, request: Request) -> list[bytes]:
        """Hashes of the request's full blocks of known tokens, extended lazily on `request`."""
        hashes, size = request.block_hashes, self.block_size
        while (len(hashes) + 1) * size <= request.num_tokens:
            i = len(hashes)
            parent = hashes[-1] if hashes else self.root_hash
            salt = request.cache_salt if i == 0 else None
            hashes.append(hash_block(parent, request.token_ids(i * size, (i + 1) * size), salt))
        return hashes

    def free(self, request: Request) -> None:
        """Release the request's blocks, deepest first (those are evicted first)."""
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self.block_pool.free_blocks(reversed(blocks))

    def fork(self, parent: Request, child: Request) -> int:
        """Share the parent's computed full prompt blocks with `child`; returns the tokens shared.

        The child must have the parent's prompt and no blocks; its `num_computed_tokens` is set to
        the shared length. The last prompt token is never covered (see the module docstring).
        """
        assert child.prompt_token_ids == parent.prompt_token_ids, "a fork shares its parent's prompt"
        assert not self.req_to_blocks.get(child.request_id), "the child must hold no blocks"
        num_tokens = min(parent.num_computed_tokens, child.num_prompt_tokens - 1)
        shared = self.req_to_blocks.get(parent.request_id, [])[: num_tokens // self.block_size]
        self.block_pool.touch(shared)
        self.req_to_blocks[child.request_id] = list(shared)
        child.num_computed_tokens = len(shared) * self.block_size
        return child.num_computed_tokens
