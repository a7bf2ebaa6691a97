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

KV groups (sliding-window layers; vLLM's hybrid allocator is the reference idea). Layers that
attend over a window of W keys form a group of their own, with its own block pool (its own block
ids, the same hash chain) and its own block table per request, indexed like every table by block
number (block i holds positions [i*B, (i+1)*B)). A query at position p reads keys from
p - W + 1 on, so once a request computes from position c on, its blocks below
`(c - W + 1) // B` are never read again: `allocate_slots` returns them to the group's pool (their
hashes stay, so they can still serve prefix hits) and puts the null block in their place. A
sliding group therefore holds at most `ceil((W - 1 + n) / B) + 1` blocks per request computing n
tokens in a step: ceil(W / B) + 1 while decoding. Full-attention layers (window None) keep every
block. Group 0 is the full-attention group when the model has one.

A prefix hit of k blocks (h = k*B tokens) needs, in every full group, blocks 0..k-1 and, in every
sliding group, only the blocks the first recomputed position still reads, `(h - W + 1) // B` to
k - 1. The hit is the longest k for which every group has those: when a window block was
evicted, the hit falls back to a shorter prefix whose window is intact (those tokens are
recomputed), never to a table with a hole the window reads. Forks (`n > 1`) share by the same rule.
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
    """Block tables of the live requests, one `BlockPool` per KV group (see the module docstring).

    `num_blocks`: the blocks of each group's pool (an int: one full-attention group);
    `windows`: each group's window (None: full attention), in the same order. The single-group
    interface (`block_pool`, `block_table`, `req_to_blocks`, what `get_computed_blocks` returns) is
    group 0's; `block_tables` gives every group's table.
    """

    def __init__(self, num_blocks: int | Sequence[int], block_size: int, cache_seed: str = "",
                 enable_caching: bool = True, on_free: Callable[[list[int]], None] | None = None,
                 windows: Sequence[int | None] = (None,)):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        group_blocks = [num_blocks] * len(windows) if isinstance(num_blocks, int) else list(num_blocks)
        if len(group_blocks) != len(windows) or not windows:
            raise ValueError(f"num_blocks must give one pool size per KV group ({len(windows)}), got {num_blocks!r}")
        for window in windows:
            if window is not None and window < 1:
                raise ValueError(f"a KV group's window must be >= 1 or None, got {window!r}")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.root_hash = root_hash(cache_seed)
        self.windows = tuple(windows)
        self.block_pools = [BlockPool(n, enable_caching, on_free) for n in group_blocks]
        self.block_pool = self.block_pools[0]
        self.tables: list[dict[str, list[Block]]] = [{} for _ in windows]  # per group: request -> blocks
        self.req_to_blocks = self.tables[0]
        self._hits: dict[str, list[list[Block]]] = {}  # groups 1.. of the last lookup, for allocate_slots
        self.prefix_cache_queries = 0  # tokens looked up
        self.prefix_cache_hits = 0  # tokens found

    @property
    def num_groups(self) -> int:
        return len(self.windows)

    @property
    def usage(self) -> float:
        """The fullest group's usage: the pool that limits admission."""
        return max(pool.usage for pool in self.block_pools)

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    def block_table(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, ())]

    def block_tables(self, request_id: str) -> tuple[list[int], ...]:
        """Every group's table (null block 0 where a sliding group gave a block back)."""
        return tuple([b.block_id for b in table.get(request_id, ())] for table in self.tables)

    def num_held_blocks(self, request_id: str) -> tuple[int, ...]:
        """Blocks the request holds in each group (null entries excluded)."""
        null = [pool.null_block for pool in self.block_pools]
        return tuple(sum(b is not null[g] for b in table.get(request_id, ())) for g, table in enumerate(self.tables))

    # One pool is the one-shard case of `ShardedKVCacheManager` (data-parallel attention): the
    # scheduler reads shards the same way from both.
    num_shards = 1

    def shard_of(self, request_id: str) -> int:
        return 0

    def placement(self, request_id: str) -> int:
        return 0

    def same_pool(self, a: Request, b: Request) -> bool:
        return True

    def first_needed_block(self, group: int, num_computed: int) -> int:
        """The first block a group still reads once positions from `num_computed` on are computed."""
        window = self.windows[group]
        return 0 if window is None else max(0, num_computed - window + 1) // self.block_size

    def _longest_prefix(self, present: list[list[bool]], max_blocks: int) -> int:
        """The longest k <= max_blocks such that every full group has blocks 0..k-1 and every
        sliding group the blocks its window reads from position k*B (`present[g][i]`)."""
        k = max_blocks
        for g, window in enumerate(self.windows):
            if window is None:
                k = next((i for i, ok in enumerate(present[g][:k]) if not ok), k)
        runs = {}  # per sliding group: run[i] = consecutive present blocks ending at block i
        for g, window in enumerate(self.windows):
            if window is not None:
                run, length = [], 0
                for ok in present[g][:k]:
                    length = length + 1 if ok else 0
                    run.append(length)
                runs[g] = run
        while k > 0 and any(k - self.first_needed_block(g, k * self.block_size) > run[k - 1]
                            for g, run in runs.items()):
            k -= 1
        return k

    def get_computed_blocks(self, request: Request, room: Sequence[int] | None = None) -> tuple[list[Block], int]:
        """The longest cached prefix of full blocks (group 0's blocks), and how many tokens it
        covers (`room`: the shards' free budgets, unused with one pool).

        Never the whole sequence: the last known token is always recomputed, so its logits exist.
        The blocks are not taken yet; pass them to `allocate_slots` (the other groups' blocks of
        the hit are kept here until then).
        """
        if not self.enable_caching or request.skip_prefix_cache:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hashes = self.block_hashes(request)[:max_blocks]
        found = [[pool.get_cached_block(h) for h in hashes] for pool in self.block_pools]
        k = self._longest_prefix([[b is not None for b in blocks] for blocks in found], max_blocks)
        groups = []
        for g, pool in enumerate(self.block_pools):
            first = self.first_needed_block(g, k * self.block_size)
            groups.append([pool.null_block] * first + found[g][first:k])
        if len(groups) > 1:
            self._hits[request.request_id] = groups[1:]
        num_tokens = k * self.block_size
        self.prefix_cache_queries += request.num_tokens
        self.prefix_cache_hits += num_tokens
        return groups[0], num_tokens

    def allocate_slots(self, request: Request, num_new_tokens: int, computed_blocks: Sequence[Block] = (),
                       num_lookahead: int = 0) -> list[int] | None:
        """Give `request` room for `num_new_tokens` more tokens (plus `num_lookahead` spare slots).

        `computed_blocks` (from `get_computed_blocks`, for a request holding no blocks yet) are
        prepended to its table and count as computed on top of `request.num_computed_tokens`.
        Sliding groups first give back the blocks their window left (see the module docstring).
        Returns the ids appended to group 0's table, computed blocks first, or None, allocating
        nothing, when some group has too few free blocks. Nothing is cached here: see `cache_blocks`.
        """
        request_id = request.request_id
        hits = self._hits.pop(request_id, None)
        groups = [list(computed_blocks)] + (hits if computed_blocks and hits else [[] for _ in self.windows[1:]])
        assert not computed_blocks or not self.req_to_blocks.get(request_id), "cache hits only for a request holding no blocks"
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        num_required = cdiv(num_computed + num_new_tokens + num_lookahead, self.block_size)
        plans = []
        for g, pool in enumerate(self.block_pools):
            table = self.tables[g].get(request_id, [])
            first = self.first_needed_block(g, num_computed)
            self._release_before(g, table, first)
            start = len(table) + len(groups[g])
            num_null = max(0, min(first, num_required) - start)
            num_new = max(0, num_required - max(start, first))
            hit_free = sum(1 for b in groups[g] if b.ref_cnt == 0)  # a hit on a free block takes it, too
            if num_new + hit_free > pool.num_free_blocks:
                return None
            plans.append((num_null, num_new))
        appended = []
        for g, (pool, (num_null, num_new)) in enumerate(zip(self.block_pools, plans)):
            hit = [b for b in groups[g] if b is not pool.null_block]
            pool.touch(hit)
            new_blocks = groups[g] + [pool.null_block] * num_null + pool.get_new_blocks(num_new)
            self.tables[g].setdefault(request_id, []).extend(new_blocks)
            if g == 0:
                appended = [b.block_id for b in new_blocks]
        return appended

    def _release_before(self, group: int, table: list[Block], first: int) -> None:
        """Give back the group's blocks below block `first` (null in their place)."""
        pool = self.block_pools[group]
        released = []
        for i in range(min(first, len(table))):
            if table[i] is not pool.null_block:
                released.append(table[i])
                table[i] = pool.null_block
        pool.free_blocks(released)

    def cache_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Register the request's blocks that are full of computed, known tokens."""
        if not self.enable_caching:
            return
        num_full = min(num_computed_tokens, request.num_tokens) // self.block_size
        hashes = self.block_hashes(request)
        for pool, table in zip(self.block_pools, self.tables):
            for block, block_hash in zip(table.get(request.request_id, [])[:num_full], hashes[:num_full]):
                if block is not pool.null_block:
                    pool.cache_block(block, block_hash)

    def block_hashes(self, request: Request) -> list[bytes]:
        """Hashes of the request's full blocks of known tokens, extended lazily on `request`."""
        hashes, size = request.block_hashes, self.block_size
        while (len(hashes) + 1) * size <= request.num_tokens:
            i = len(hashes)
            parent = hashes[-1] if hashes else self.root_hash
            salt = request.cache_salt if i == 0 else None
            hashes.append(hash_block(parent, request.token_ids(i * size, (i + 1) * size), salt))
        return hashes

    def forget_lookup(self, request_id: str) -> None:
        """Drop the other groups' blocks of a lookup that will not be allocated here."""
        self._hits.pop(request_id, None)

    def free(self, request: Request) -> None:
        """Release the request's blocks, deepest first (those are evicted first)."""
        self.forget_lookup(request.request_id)
        for pool, table in zip(self.block_pools, self.tables):
            blocks = table.pop(request.request_id, [])
            pool.free_blocks(b for b in reversed(blocks) if b is not pool.null_block)

    def fork(self, parent: Request, child: Request) -> int:
        """Share the parent's computed full prompt blocks with `child`; returns the tokens shared.

        The child must have the parent's prompt and no blocks; its `num_computed_tokens` is set to
        the shared length. The last prompt token is never covered (see the module docstring), and
        a sliding group's window before the shared length must still be held by the parent.
        """
        assert child.prompt_token_ids == parent.prompt_token_ids, "a fork shares its parent's prompt"
        assert not self.req_to_blocks.get(child.request_id), "the child must hold no blocks"
        num_blocks = min(parent.num_computed_tokens, child.num_prompt_tokens - 1) // self.block_size
        parents = [table.get(parent.request_id, [])[:num_blocks] for table in self.tables]
        present = [[b is not pool.null_block for b in blocks] for pool, blocks in zip(self.block_pools, parents)]
        k = self._longest_prefix(present, min(num_blocks, *(len(p) for p in parents)))
        for g, (pool, blocks) in enumerate(zip(self.block_pools, parents)):
            first = self.first_needed_block(g, k * self.block_size)
            shared = [pool.null_block] * first + blocks[first:k]
            pool.touch(b for b in shared if b is not pool.null_block)
            self.tables[g][child.request_id] = shared
        child.num_computed_tokens = k * self.block_size
        return child.num_computed_tokens
