"""Data-parallel attention on the host side: one `KVCacheManager` (block pool + prefix cache) per
dp shard, behind the interface the scheduler already uses.

The KV cache's block axis is split over the mesh's `dp` axis (models/dp_attention.py): shard s
holds blocks [s * B, (s + 1) * B) of the global cache, B = `num_blocks_per_shard`, and block ids
in a request's table are local to its shard (each shard keeps its own null block 0). So a request
lives on one shard from admission until it is freed:

- Admission (`get_computed_blocks`, called for a request that holds no blocks) looks the prompt
  up in every shard's prefix cache and picks, among the shards with free blocks for the whole
  prompt (all shards if none has), the one with the longest hit, then the one with the fewest
  used blocks, then the fewest requests. If the pick has no hit and too few free blocks for the
  first chunk, `allocate_slots` falls back to the least-loaded shard that fits.
- Per-shard step budgets (jaxserve/scheduler.py): the scheduler passes `room`, the tokens each
  shard can still take this step (0 once its token budget or its seats are used up). Only shards
  with room are picked, and the fallback goes only to shards with room for the whole first chunk,
  so a full or busy shard never receives a request while another can take it.
- `n > 1` children (`fork`) stay on the parent's shard, sharing its prompt blocks.
- Freeing (finish, preemption) returns blocks to the request's shard; the scheduler preempts
  only requests on the same shard (`same_pool`), since only those free blocks that help.
- Statistics (`usage`, prefix-cache queries and hits) sum over shards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from jaxserve.kv.block_pool import Block
from jaxserve.kv.cache_manager import KVCacheManager
from jaxserve.request import Request


class ShardedKVCacheManager:
    """`KVCacheManager`'s interface over `num_shards` independent pools of local block ids."""

    def __init__(self, num_shards: int, num_blocks_per_shard: int | Sequence[int], block_size: int,
                 cache_seed: str = "", enable_caching: bool = True, windows: Sequence[int | None] = (None,)):
        if not isinstance(num_shards, int) or num_shards < 1:
            raise ValueError(f"num_shards must be an integer >= 1, got {num_shards!r}")
        self.shards = [KVCacheManager(num_blocks_per_shard, block_size, cache_seed, enable_caching, windows=windows)
                       for _ in range(num_shards)]
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.root_hash = self.shards[0].root_hash
        # Per KV group (jaxserve/kv/cache_manager.py), every shard's pool of that group.
        self.block_pools = [_PoolGroup(self, group) for group in range(len(windows))]
        self.block_pool = self.block_pools[0]
        self.req_to_shard: dict[str, int] = {}  # requests holding blocks
        # Picked by get_computed_blocks, not yet allocated: request id -> (shard, room or None).
        self._admitting: dict[str, tuple[int, tuple[int, ...] | None]] = {}

    # ---- which shard ----

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def shard_of(self, request_id: str) -> int:
        """The shard whose pool holds the request's blocks."""
        return self.req_to_shard[request_id]

    def placement(self, request_id: str) -> int:
        """The shard holding the request's blocks, else the one `get_computed_blocks` just picked."""
        shard = self.req_to_shard.get(request_id)
        return self._admitting[request_id][0] if shard is None else shard

    def same_pool(self, a: Request, b: Request) -> bool:
        """Whether freeing `a`'s blocks can make room for `b` (both on one shard)."""
        return self.req_to_shard.get(a.request_id) == self.req_to_shard.get(b.request_id)

    def _load(self, shard: int) -> tuple[int, int]:
        manager = self.shards[shard]
        used = manager.block_pool.num_blocks - 1 - manager.num_free_blocks
        return used, len(manager.req_to_blocks)

    def _pick(self, request: Request, room: Sequence[int] | None) -> tuple[int, list[Block], int]:
        """(shard, cached blocks, cached tokens) among the shards with `room` (all if None): a
        shard with room for the whole prompt first, then the longest hit, then fewest used blocks /
        requests. A hit on a full shard would leave the request waiting at the head of the queue
        while another shard has room."""
        best = None
        for shard, manager in enumerate(self.shards):
            if room is not None and room[shard] <= 0:
                continue
            blocks, num_tokens = manager.get_computed_blocks(request)
            needed = -(-request.num_tokens // self.block_size) - len(blocks)
            free = manager.num_free_blocks - sum(1 for b in blocks if b.ref_cnt == 0)  # hits leave the free list
            key = (needed > free, -num_tokens, *self._load(shard))
            if best is None or key < best[0]:
                best = (key, shard, blocks, num_tokens)
        return best[1], best[2], best[3]

    # ---- the KVCacheManager interface ----

    def get_computed_blocks(self, request: Request, room: Sequence[int] | None = None) -> tuple[list[Block], int]:
        """Pick the request's shard (see the module docstring) and return its cached prefix there.

        `room[s]`: tokens shard s can still take this step (the scheduler's per-shard budget, 0
        when it has no token or no seat left); only shards with room are considered. None: all.
        """
        if room is not None:
            if len(room) != len(self.shards):
                raise ValueError(f"room must have one entry per shard ({len(self.shards)}), got {len(room)}")
            if max(room) <= 0:
                raise ValueError(f"room must leave at least one shard > 0, got {list(room)}")
            room = tuple(room)
        before = [(m.prefix_cache_queries, m.prefix_cache_hits) for m in self.shards]
        shard, blocks, num_tokens = self._pick(request, room)
        for manager, (queries, hits) in zip(self.shards, before):  # count the lookup once
            manager.prefix_cache_queries, manager.prefix_cache_hits = queries, hits
        if self.enable_caching and not request.skip_prefix_cache:
            self.shards[shard].prefix_cache_queries += request.num_tokens
            self.shards[shard].prefix_cache_hits += num_tokens
        self._admitting[request.request_id] = (shard, room)
        return blocks, num_tokens

    def allocate_slots(self, request: Request, num_new_tokens: int, computed_blocks: Sequence[Block] = (),
                       num_lookahead: int = 0) -> list[int] | None:
        request_id = request.request_id
        shard = self.req_to_shard.get(request_id)
        if shard is None:
            shard, room = self._admitting.pop(request_id, (None, None))
            candidates = [shard] if shard is not None else []
            if not computed_blocks:  # nothing cached to lose: any shard that fits will do
                others = [s for s in range(len(self.shards))
                          if s != shard and (room is None or room[s] >= num_new_tokens)]
                candidates += sorted(others, key=self._load)
            for candidate in candidates:
                ids = self.shards[candidate].allocate_slots(request, num_new_tokens, computed_blocks, num_lookahead)
                if ids is not None:
                    self.req_to_shard[request_id] = candidate
                    for manager in self.shards:  # the lookups of the shards not picked
                        manager.forget_lookup(request_id)
                    return ids
            return None
        return self.shards[shard].allocate_slots(request, num_new_tokens, computed_blocks, num_lookahead)

    def cache_blocks(self, request: Request, num_computed_tokens: int) -> None:
        shard = self.req_to_shard.get(request.request_id)
        if shard is not None:
            self.shards[shard].cache_blocks(request, num_computed_tokens)

    def block_table(self, request_id: str) -> list[int]:
        shard = self.req_to_shard.get(request_id)
        return [] if shard is None else self.shards[shard].block_table(request_id)

    def block_tables(self, request_id: str) -> tuple[list[int], ...]:
        shard = self.req_to_shard.get(request_id)
        if shard is None:
            return tuple([] for _ in self.block_pools)
        return self.shards[shard].block_tables(request_id)

    def num_held_blocks(self, request_id: str) -> tuple[int, ...]:
        shard = self.req_to_shard.get(request_id)
        return (0,) * len(self.block_pools) if shard is None else self.shards[shard].num_held_blocks(request_id)

    def block_hashes(self, request: Request) -> list[bytes]:
        return self.shards[0].block_hashes(request)  # one hash chain for every shard

    def free(self, request: Request) -> None:
        self._admitting.pop(request.request_id, None)
        for manager in self.shards:
            manager.forget_lookup(request.request_id)
        shard = self.req_to_shard.pop(request.request_id, None)
        if shard is not None:
            self.shards[shard].free(request)

    def fork(self, parent: Request, child: Request) -> int:
        """The child joins the parent's shard and shares its computed full prompt blocks."""
        shard = self.req_to_shard[parent.request_id]
        self.req_to_shard[child.request_id] = shard
        return self.shards[shard].fork(parent, child)

    # ---- statistics, summed over shards ----

    @property
    def usage(self) -> float:
        """The fullest KV group's usage over all shards."""
        return max(1.0 - sum(m.block_pools[g].num_free_blocks for m in self.shards)
                   / sum(m.block_pools[g].num_blocks - 1 for m in self.shards) for g in range(len(self.block_pools)))

    @property
    def num_free_blocks(self) -> int:
        return sum(m.num_free_blocks for m in self.shards)

    @property
    def prefix_cache_queries(self) -> int:
        return sum(m.prefix_cache_queries for m in self.shards)

    @property
    def prefix_cache_hits(self) -> int:
        return sum(m.prefix_cache_hits for m in self.shards)


class _PoolGroup:
    """One KV group's pools' callbacks, set once for all shards; `on_free` receives (block ids, shard)."""

    def __init__(self, owner: ShardedKVCacheManager, group: int = 0):
        self._owner = owner
        self._group = group

    @property
    def num_blocks(self) -> int:
        return sum(m.block_pools[self._group].num_blocks for m in self._owner.shards)

    def _set(self, name: str, callback: Callable | None, with_shard: bool) -> None:
        for shard, manager in enumerate(self._owner.shards):
            bound = callback
            if callback is not None and with_shard:
                bound = (lambda s: lambda ids: callback(ids, shard=s))(shard)
            setattr(manager.block_pools[self._group], name, bound)

    def __setattr__(self, name: str, value) -> None:
        if name in ("on_free", "on_evict"):
            self._set(name, value, with_shard=name == "on_free")
        else:
            object.__setattr__(self, name, value)
