"""The configurations the Mosaic GPU attention tests cover, and `lowering_cases()`: the same
configurations (plus decode-only and serving-sized steps) as (function, argument specs) pairs that
must lower for a Hopper CUDA target on a machine without a GPU.

Imports jax only: a CI test runs `lowering_cases()` in a subprocess that has the Mosaic GPU
bindings (the jax-cuda plugin) on its path, through `lower_mosaic_for_cuda`.

How far lowering goes without a GPU: tracing under an abstract H100 mesh and lowering for "cuda"
runs the whole Python side of Mosaic GPU: the Pallas kernel becomes a Mosaic GPU MLIR module,
layout inference and the dialect lowering turn it into gpu/nvvm/llvm ops (TMA copies, mbarriers,
wgmma as inline PTX), the module passes the MLIR verifier, and its shared memory is checked
against 227 KiB (no device to ask). Not checked: the C++ passes and ptxas that run when XLA
compiles the custom call on a GPU (PTX generation, register allocation and spills), the TMA
descriptors built at run time (address and stride alignment), and anything about timing.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import AbstractDevice, AbstractMesh

from pallas_kernels import FP8_DTYPE
from pallas_kernels.mosaic_paged_attention import ragged_paged_attention_mosaic

NUM_KV_HEADS = 2
WINDOW = 40
SOFT_CAP = 2.0
# (head_dim, block_size, cache, GQA group, sliding window, soft cap, KV splits, sinks): every pair of
# values of any two factors appears in some row (tests check it). The first 12 rows cover all
# pairs but some head_dim x block_size ones and run by default; the rest are marked slow.
PAIRWISE = [
    (96, 16, "bf16", 4, None, SOFT_CAP, 3, True),
    (256, 16, "fp8", 3, WINDOW, None, 1, False),
    (192, 64, "fp8", 8, None, None, 3, False),
    (192, 8, "bf16", 1, WINDOW, SOFT_CAP, 1, True),
    (128, 128, "fp8", 3, None, SOFT_CAP, 3, True),
    (64, 8, "fp8", 4, None, None, 1, True),
    (256, 8, "bf16", 8, WINDOW, SOFT_CAP, 3, True),
    (96, 128, "bf16", 1, None, None, 1, False),
    (80, 64, "bf16", 4, None, SOFT_CAP, 1, True),
    (64, 16, "fp8", 1, WINDOW, SOFT_CAP, 3, False),
    (80, 128, "fp8", 8, WINDOW, None, 3, False),
    (128, 8, "bf16", 4, WINDOW, None, 1, False),
    (96, 64, "fp8", 8, WINDOW, SOFT_CAP, 1, True),
    (64, 64, "bf16", 3, None, None, 3, False),
    (256, 64, "bf16", 1, None, SOFT_CAP, 1, True),
    (96, 8, "bf16", 3, WINDOW, SOFT_CAP, 1, False),
    (256, 128, "fp8", 4, WINDOW, None, 3, True),
    (128, 16, "bf16", 8, None, SOFT_CAP, 3, False),
    (128, 64, "bf16", 1, None, SOFT_CAP, 1, True),
    (80, 16, "fp8", 1, WINDOW, None, 1, False),
    (192, 128, "fp8", 4, WINDOW, None, 3, True),
    (192, 16, "fp8", 3, WINDOW, SOFT_CAP, 1, False),
    (80, 8, "fp8", 3, WINDOW, None, 1, True),
    (64, 128, "fp8", 8, WINDOW, None, 1, False),
]
FACTORS = [[64, 80, 96, 128, 192, 256], [8, 16, 64, 128], ["bf16", "fp8"], [1, 3, 4, 8],
           [None, WINDOW], [None, SOFT_CAP], [1, 3], [False, True]]
FAST = PAIRWISE[:12]


def mixed_lens(block_size: int) -> tuple[list[int], list[int]]:
    """(q_lens, kv_lens) of a mixed step: decodes at a page boundary and either side of it, a
    prefill from scratch, a chunk continuing a prefix (two query blocks for groups >= 4), and a
    decode over several tiles."""
    return [1, 1, 1, 9, 20, 1], [block_size - 1, block_size, block_size + 1, 9, 52, 150]


# A decode-only step: long and short contexts, one of them a single key.
DECODE_LENS = ([1, 1, 1, 1], [200, 17, 64, 1])

H100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="gpu")


def cache_dtype(kind: str):
    return {"bf16": jnp.bfloat16, "fp8": FP8_DTYPE}[kind]


def _specs(num_tokens, num_seqs, width, num_pages, *, group, head_dim, block_size, kind, num_kv_heads,
           sinks=False):
    spec = jax.ShapeDtypeStruct
    cache = spec((num_pages, block_size, num_kv_heads, head_dim), cache_dtype(kind))
    return (spec((num_tokens, num_kv_heads * group, head_dim), jnp.bfloat16), cache, cache,
            spec((num_seqs,), jnp.int32), spec((num_seqs, width), jnp.int32),
            spec((num_seqs + 1,), jnp.int32), spec((), jnp.int32), spec((), jnp.float32),
            spec((), jnp.float32), spec((num_kv_heads * group,), jnp.float32) if sinks else None)


def _attention(q, k, v, kv_lens, tables, cu_q_lens, num_seqs, k_scale, v_scale, sinks, *, head_dim,
               window, cap, splits):
    return ragged_paged_attention_mosaic(
        q, k, v, kv_lens, tables, cu_q_lens, num_seqs, sm_scale=head_dim**-0.5,
        sliding_window=window, soft_cap=cap, k_scale=k_scale, v_scale=v_scale, sinks=sinks, num_kv_splits=splits)


def lowering_cases() -> list[tuple[str, object, tuple]]:
    """(name, function, argument ShapeDtypeStructs) for every tested configuration in the mixed
    step's shapes, every head_dim decode-only with 16-key bf16 and 8-key fp8 pages (default
    splits), and a serving-sized decode (batch 32, 4k context) per cache dtype."""
    cases = []
    for head_dim, block_size, kind, group, window, cap, splits, sinks in PAIRWISE:
        q_lens, kv_lens = mixed_lens(block_size)
        width = -(-max(kv_lens) // block_size) + 1
        args = _specs(sum(q_lens) + 3, len(q_lens) + 1, width, 1 + width * len(q_lens), group=group,
                      head_dim=head_dim, block_size=block_size, kind=kind, num_kv_heads=NUM_KV_HEADS, sinks=sinks)
        fn = functools.partial(_attention, head_dim=head_dim, window=window, cap=cap, splits=splits)
        cases.append((f"mixed-d{head_dim}-bs{block_size}-{kind}-g{group}-w{window}-c{cap}-s{splits}-sinks{sinks}",
                      fn, args))
    for head_dim in FACTORS[0]:
        for block_size, kind in ((16, "bf16"), (8, "fp8")):
            width = -(-max(DECODE_LENS[1]) // block_size)
            args = _specs(8, 8, width, 1 + 4 * width, group=4, head_dim=head_dim, block_size=block_size,
                          kind=kind, num_kv_heads=NUM_KV_HEADS)
            fn = functools.partial(_attention, head_dim=head_dim, window=None, cap=None, splits=None)
            cases.append((f"decode-d{head_dim}-bs{block_size}-{kind}", fn, args))
    for kind in ("bf16", "fp8"):
        args = _specs(32, 32, 256, 1 + 32 * 256, group=4, head_dim=128, block_size=16, kind=kind,
                      num_kv_heads=8)
        fn = functools.partial(_attention, head_dim=128, window=None, cap=None, splits=None)
        cases.append((f"serving-decode-b32-ctx4k-{kind}", fn, args))
    return cases


def lower_mosaic_for_cuda(fn, *args) -> tuple[str, int]:
    """Lowers `fn` for an H100 without a GPU; returns the StableHLO text and the number of Mosaic
    GPU modules built, each verified again here (Mosaic verifies them once itself)."""
    from jax._src.pallas.mosaic_gpu import lowering

    modules = []
    original = lowering.lower_unpipelined_jaxpr_to_module

    def capture(*a, **kw):
        result = original(*a, **kw)
        modules.append(result.module)
        return result

    lowering.lower_unpipelined_jaxpr_to_module = capture
    try:
        with jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=H100)):
            text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    finally:
        lowering.lower_unpipelined_jaxpr_to_module = original
    for module in modules:
        module.operation.verify()
    assert "mosaic_gpu" in text, "no Mosaic GPU custom call in the lowered module"
    return text, len(modules)
