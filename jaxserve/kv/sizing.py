"""How many KV blocks fit, and the longest context they allow (`max_model_len`, "auto")."""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig, cdiv
from models.config import ModelConfig
from models.registry import kv_spec

logger = logging.getLogger("jaxserve.kv")


@dataclasses.dataclass(frozen=True)
class KVPlan:
    """How the KV budget is spent. Group 0's blocks are `num_blocks` (the null block included)
    of `bytes_per_block`; with sliding-window KV groups (jaxserve/kv/cache_manager.py) every group
    has its own pool: `group_blocks[g]` blocks of `group_bytes_per_block[g]`, for the layers
    whose `layer_groups` entry is g."""

    budget_bytes: int
    bytes_per_block: int
    num_blocks: int  # including the null block 0
    block_size: int
    max_model_len: int
    group_windows: tuple[int | None, ...] = (None,)
    group_blocks: tuple[int, ...] = ()
    group_bytes_per_block: tuple[int, ...] = ()
    layer_groups: tuple[int, ...] = ()

    @property
    def num_tokens(self) -> int:
        return (self.num_blocks - 1) * self.block_size


def kv_bytes_per_token(model: ModelConfig, kv_dtype) -> int:
    """Cache bytes of one token, as the model family's KV spec lays it out (models/kv_spec.py)."""
    return kv_spec(model).bytes_per_token(kv_dtype)


def kv_budget_bytes(config: EngineConfig) -> int:
    """CPU: `kv_cache_memory_bytes` or a fixed default. GPU/TPU: free device memory (after the
    weights are loaded) times `gpu_memory_utilization`, less a reserve for activations."""
    if config.kv_cache_memory_bytes:
        return config.kv_cache_memory_bytes
    device = jax.local_devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if not stats or "bytes_limit" not in stats:
        return DEFAULT_CPU_KV_CACHE_BYTES
    limit, in_use = stats["bytes_limit"], stats.get("bytes_in_use", 0)
    activation_reserve = int(0.05 * limit)
    return smallest_across_processes(max(0, int(limit * config.gpu_memory_utilization) - in_use - activation_reserve))


def smallest_across_processes(value: int) -> int:
    """Multi-host: every process must plan the same cache (same blocks, same schedule), so all
    take the smallest budget; one collective at start-up. One process: `value` itself."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(np.min(multihost_utils.process_allgather(np.int64(value))))


def kv_group_windows(model: ModelConfig, reason_single: str | None) -> tuple[int | None, ...]:
    """The KV groups the engine manages: one per distinct layer window (models/kv_spec.py), or
    one group for every layer (windows applied, no block given back) when `reason_single` says
    why the groups cannot be used (a KV connector moves whole blocks of every layer)."""
    windows = kv_spec(model).group_windows()
    if windows == (None,):
        return windows
    if reason_single:
        logger.info("KV cache: sliding-window layers keep every block (one KV group): %s", reason_single)
        return (None,)
    return windows


def plan_kv_cache(config: EngineConfig, model: ModelConfig, kv_dtype,
                  windows: tuple[int | None, ...] = (None,), extra_bytes_per_token: int = 0) -> KVPlan:
    """The blocks of every KV group (`windows`, from `kv_group_windows`) and `max_model_len`.
    `extra_bytes_per_token`: what else lives in group 0's blocks (a speculative draft head's
    cache layer, jaxserve/spec_decode/draft_head.py)."""
    if extra_bytes_per_token:
        logger.info("KV cache: a draft head's cache layer adds %d bytes per token", extra_bytes_per_token)
    if windows != (None,):
        return _plan_groups(config, model, kv_dtype, windows, extra_bytes_per_token)
    budget = kv_budget_bytes(config)
    per_block = config.block_size * (kv_bytes_per_token(model, kv_dtype) + extra_bytes_per_token)
    blocks = budget // per_block
    capacity = (blocks - 1) * config.block_size
    native = model.max_position_embeddings
    requested = config.max_model_len
    if requested in (None, "auto"):
        if capacity < config.block_size:
            raise ValueError(
                f"the KV cache budget of {budget} bytes holds {max(blocks, 0)} blocks of "
                f"{per_block} bytes: too few for any sequence; raise kv_cache_memory_bytes or "
                "gpu_memory_utilization")
        max_model_len = min(native, capacity)
    else:
        if requested > native:
            raise ValueError(f"max_model_len must be <= the model's {native} positions, got {requested}")
        if requested > capacity:
            raise ValueError(
                f"max_model_len {requested} needs {cdiv(requested, config.block_size) + 1} KV blocks but the "
                f"budget of {budget} bytes holds {blocks}; lower max_model_len, use 'auto', or give the "
                "KV cache more memory")
        max_model_len = requested
    # More blocks than every slot could hold at full length never help; don't allocate them.
    useful = config.max_num_reqs * cdiv(max_model_len, config.block_size) + 1
    num_blocks = int(min(blocks, useful))
    plan = KVPlan(budget, per_block, num_blocks, config.block_size, max_model_len, (None,), (num_blocks,),
                  (per_block,), (0,) * kv_spec(model).num_layers)
    logger.info(
        "KV cache: budget %.1f MiB, %d blocks of %d tokens (%d KiB each, %s), %d tokens; max_model_len %d%s",
        budget / 2**20, num_blocks, config.block_size, per_block // 1024, jnp.dtype(kv_dtype).name,
        plan.num_tokens, max_model_len, " (auto)" if requested in (None, "auto") else "")
    _log_layout(model, kv_dtype, blocks, config.block_size)
    return plan


def _log_layout(model: ModelConfig, kv_dtype, blocks: int, block_size: int) -> None:
    spec = kv_spec(model)
    itemsize = jnp.dtype(kv_dtype).itemsize
    expanded = ("" if spec.expanded_token_elements is None else
                f", against {spec.expanded_token_elements * itemsize} as per-head K and V "
                f"({spec.expanded_token_elements / spec.token_elements:.1f}x)")
    logger.info("KV cache: %d bytes per token (%s, %s)%s", spec.bytes_per_token(kv_dtype), spec.signature(),
                jnp.dtype(kv_dtype).name, expanded)
    if jnp.dtype(kv_dtype).itemsize == 1:
        logger.info("KV cache: fp8 stores %d bytes per token against %d for bf16, so the budget holds 2x "
                    "the tokens (%d blocks of %d tokens)", kv_bytes_per_token(model, kv_dtype),
                    kv_bytes_per_token(model, jnp.bfloat16), blocks, block_size)


def _plan_groups(config: EngineConfig, model: ModelConfig, kv_dtype, windows: tuple[int | None, ...],
                 extra_bytes_per_token: int = 0) -> KVPlan:
    """Pools for KV groups. A sliding group of window W never needs more than
    `ceil((W - 1 + n) / B) + 1` blocks per request computing n tokens in a step, so it gets
    `cap = max_num_seqs * (ceil((W - 1) / B) + 3) + ceil(max_num_batched_tokens / B) + 1` blocks
    (then it never limits admission), but never more than the blocks the one-group cache would
    have (every layer keeping every block, `budget / bytes of a block of all layers`): no group
    holds fewer blocks than without groups. Full-attention groups take the rest, and bound
    `max_model_len`."""
    spec = kv_spec(model)
    size, budget = config.block_size, kv_budget_bytes(config)
    layer_groups = spec.layer_groups(windows)
    itemsize = jnp.dtype(kv_dtype).itemsize
    per_block = [size * itemsize * sum(a.token_elements for layer, grp in zip(spec.layers, layer_groups) if grp == g
                                      for a in layer.arrays) for g in range(len(windows))]
    per_block[0] += size * extra_bytes_per_token
    native, requested = model.max_position_embeddings, config.max_model_len
    auto = requested in (None, "auto")
    if not auto and requested > native:
        raise ValueError(f"max_model_len must be <= the model's {native} positions, got {requested}")
    one_group = budget // sum(per_block)
    blocks = [0] * len(windows)
    for g, w in enumerate(windows):
        if w is None:
            continue
        cap = config.max_num_seqs * (cdiv(w - 1, size) + 3) + cdiv(config.max_num_batched_tokens, size) + 1
        least = cdiv(w - 1 + config.max_num_batched_tokens, size) + 2  # one request's longest step
        blocks[g] = max(least, min(cap, one_group))
    left = budget - sum(n * b for n, b in zip(blocks, per_block))
    full = [g for g, w in enumerate(windows) if w is None]
    full_blocks = left // sum(per_block[g] for g in full) if full else 0
    capacity = (full_blocks - 1) * size if full else native
    if left < 0 or (full and capacity < size):
        raise ValueError(
            f"the KV cache budget of {budget} bytes cannot hold the sliding-window groups' "
            f"{sum(n * b for n, b in zip(blocks, per_block))} bytes and any full-attention block; "
            "raise kv_cache_memory_bytes or gpu_memory_utilization")
    if auto:
        max_model_len = min(native, capacity)
    elif requested > capacity:
        raise ValueError(
            f"max_model_len {requested} needs {cdiv(requested, size) + 1} KV blocks per full-attention layer but "
            f"the budget of {budget} bytes holds {full_blocks} beside the sliding-window layers' pools; lower "
            "max_model_len, use 'auto', or give the KV cache more memory")
    else:
        max_model_len = requested
    useful = config.max_num_reqs * cdiv(max_model_len, size) + 1
    for g in full:
        blocks[g] = int(min(full_blocks, useful))
    plan = KVPlan(budget, per_block[0], blocks[0], size, max_model_len, tuple(windows), tuple(blocks),
                  tuple(per_block), layer_groups)
    for g, w in enumerate(windows):
        layers = layer_groups.count(g)
        what = "full-attention" if w is None else f"sliding-window ({w} keys)"
        logger.info("KV cache: %d %s layers: %d blocks of %d tokens (%d KiB each)%s", layers, what, blocks[g], size,
                    per_block[g] // 1024, f", {(blocks[g] - 1) * size} tokens" if w is None else
                    f", at most {cdiv(w - 1, size) + 2} per decoding request")
    logger.info("KV cache: budget %.1f MiB; max_model_len %d%s", budget / 2**20, max_model_len, " (auto)" if auto else "")
    _log_layout(model, kv_dtype, blocks[0], size)
    return plan
