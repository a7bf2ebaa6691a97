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
    budget_bytes: int
    bytes_per_block: int
    num_blocks: int  # including the null block 0
    block_size: int
    max_model_len: int

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


def plan_kv_cache(config: EngineConfig, model: ModelConfig, kv_dtype) -> KVPlan:
    budget = kv_budget_bytes(config)
    per_block = config.block_size * kv_bytes_per_token(model, kv_dtype)
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
    plan = KVPlan(budget, per_block, num_blocks, config.block_size, max_model_len)
    logger.info(
        "KV cache: budget %.1f MiB, %d blocks of %d tokens (%d KiB each, %s), %d tokens; max_model_len %d%s",
        budget / 2**20, num_blocks, config.block_size, per_block // 1024, jnp.dtype(kv_dtype).name,
        plan.num_tokens, max_model_len, " (auto)" if requested in (None, "auto") else "")
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
                    kv_bytes_per_token(model, jnp.bfloat16), blocks, config.block_size)
    return plan
