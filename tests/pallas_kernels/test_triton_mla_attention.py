"""The Triton-lowered MLA kernel: interpret mode against the reference, and CUDA lowering (with the
MLIR verifier) at DeepSeek's shapes, without a GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import FP8_DTYPE, choose_mla_kernel, mla_paged_attention, mla_paged_attention_reference
from pallas_kernels.triton_mla_attention import (
    column_layout,
    mla_paged_attention_triton,
    row_pieces,
    unsupported_reason,
)
from tests.pallas_kernels.cuda_lowering import captured_triton_modules, lower_and_verify
from tests.pallas_kernels.test_mla_attention import (
    MIXED,
    RANK,
    ROPE,
    VALID,
    absorbed_query,
    make_mla_batch,
    write_latent_cache,
)

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
spec = jax.ShapeDtypeStruct


def kernel_batch(seed, *, num_heads, block_size, kind):
    """The absorbed batch with the cache in `kind` ("f32", "bf16", "fp8" with a scale); stale slots
    and the null block poisoned with NaN. Returns (args, scale)."""
    rng = np.random.default_rng(seed)
    q, cache, lens, tables, cu, w_uk, _ = make_mla_batch(rng, *MIXED, num_heads=num_heads, block_size=block_size)
    for s, kv_len in enumerate(lens):
        for pos in range(kv_len, tables.shape[1] * block_size):
            cache[tables[s, pos // block_size], pos % block_size] = np.nan
    cache[0] = np.nan
    q, cache, scale = jnp.asarray(absorbed_query(q, w_uk)), jnp.asarray(cache), None
    if kind == "bf16":
        q, cache = q.astype(jnp.bfloat16), cache.astype(jnp.bfloat16)
    elif kind == "fp8":
        scale = jnp.float32(0.05)
        rows = cache.reshape(-1, RANK + ROPE)
        q, cache = q.astype(jnp.bfloat16), write_latent_cache(jnp.zeros(cache.shape, FP8_DTYPE), rows,
                                                              jnp.arange(rows.shape[0]), scale)
    return (q, cache, *map(jnp.asarray, (lens, tables, cu)), jnp.int32(len(MIXED[0]))), scale


# (heads, page size, cache, heads per program, KV splits, 16-bit word reads): one head block of
# 4 with 4-query blocks; 12 heads in blocks of 8 (the second one padded) over 4-key pages, split
# three ways; fp8 read as words with 8-query blocks of 2 heads.
CASES = [(4, 16, "f32", None, 1, False), (12, 4, "bf16", 8, 3, False), (2, 16, "fp8", None, 2, True)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_kernel_matches_the_reference(case):
    num_heads, block_size, kind, block_h, splits, words = case
    args, scale = kernel_batch(CASES.index(case), num_heads=num_heads, block_size=block_size, kind=kind)
    out = mla_paged_attention_triton(*args, kv_lora_rank=RANK, sm_scale=0.1, scale=scale, block_h=block_h,
                                     num_kv_splits=splits, read_words=words, interpret=True)
    ref = mla_paged_attention_reference(*args, kv_lora_rank=RANK, sm_scale=0.1, scale=scale)
    assert out.dtype == args[0].dtype and out.shape == (VALID + 3, num_heads, RANK)
    out, ref = np.asarray(out.astype(jnp.float32)), np.asarray(ref.astype(jnp.float32))
    assert np.all(np.isfinite(out)), "NaN reached the output (stale or null-block slots)"
    assert not np.any(out[VALID:]), "padding rows must be zero"
    # float32: only the accumulation order differs. 16-bit: probabilities enter the value dot in
    # 16 bits and the output is rounded to bf16 (2^-9 relative).
    tolerance = 1e-5 if kind == "f32" else 1e-2
    assert np.max(np.abs(out - ref)) / np.max(np.abs(ref)) < tolerance


def test_dispatch_runs_the_kernel_with_interpret():
    args, _ = kernel_batch(7, num_heads=16, block_size=16, kind="f32")
    kernel = mla_paged_attention(*args, kv_lora_rank=RANK, sm_scale=0.1, backend="pallas", interpret=True)
    reference = mla_paged_attention(*args, kv_lora_rank=RANK, sm_scale=0.1, backend="reference")
    np.testing.assert_allclose(np.asarray(kernel), np.asarray(reference), rtol=1e-4, atol=1e-5)


DEEPSEEK = dict(num_heads=128, kv_lora_rank=512, rope_dim=64, block_size=64, q_dtype=jnp.bfloat16,
                cache_dtype=jnp.bfloat16)


def test_dispatch_picks_triton_on_a_gpu_and_mosaic_says_why_not():
    for requested in ("pallas", "auto"):
        for capability in ((9, 0), (10, 0)):
            choice = choose_mla_kernel(requested, **DEEPSEEK, capability=capability, platform="gpu")
            assert choice.backend == "triton", choice
            assert "Mosaic GPU: no Mosaic GPU MLA kernel" in choice.reason or requested == "auto", choice
    odd = choose_mla_kernel("pallas", **{**DEEPSEEK, "rope_dim": 40}, capability=(9, 0), platform="gpu")
    assert odd.backend == "reference" and "Triton: rope_dim 40 must be a multiple of 16" in odd.reason


def test_unsupported_shapes_name_the_reason():
    assert unsupported_reason(**DEEPSEEK) is None
    assert "kv_lora_rank 500" in unsupported_reason(**{**DEEPSEEK, "kv_lora_rank": 500})
    assert "q dtype float8_e4m3fn" in unsupported_reason(**{**DEEPSEEK, "q_dtype": FP8_DTYPE})
    q, cache = jnp.zeros((2, 4, 72)), jnp.zeros((3, 16, 72))
    with pytest.raises(ValueError, match="rope_dim 8 must be a multiple of 16"):
        mla_paged_attention_triton(q, cache, jnp.ones(1, jnp.int32), jnp.zeros((1, 1), jnp.int32),
                                   jnp.array([0, 2], jnp.int32), jnp.int32(1), kv_lora_rank=64, sm_scale=1.0)


def test_row_pieces_cover_every_column_once():
    assert row_pieces(512, 64) == ((0, 128), (128, 128), (256, 128), (384, 128), (512, 64))
    assert row_pieces(80, 48) == ((0, 64), (64, 16), (80, 32), (112, 16))
    for rank, rope, lanes in ((512, 64, 1), (512, 64, 2), (80, 48, 1), (64, 32, 2), (64, 0, 1)):
        layout = column_layout(rank, rope, lanes)
        assert sorted(layout) == list(range(rank + rope)), (rank, rope, lanes)
        assert sorted(layout[:rank]) == list(range(rank)), "the first L kernel columns are the latent ones"


def deepseek_specs(batch, context, cache_dtype, *, num_heads=128, tokens=None, block_size=64):
    """The decode benchmark's arguments as abstract values (no memory): a batch of `batch` rows
    over `context` keys each; `tokens` query rows (default one per row)."""
    per_seq = -(-context // block_size)
    return (spec((tokens or batch, num_heads, 576), jnp.bfloat16), spec((batch * per_seq + 1, block_size, 576), cache_dtype),
            spec((batch,), jnp.int32), spec((batch, per_seq), jnp.int32), spec((batch + 1,), jnp.int32),
            spec((), jnp.int32), spec((), jnp.float32))


@pytest.mark.parametrize("cache_dtype", [jnp.bfloat16, FP8_DTYPE], ids=["bf16", "fp8"])
def test_deepseek_shapes_lower_and_verify(cache_dtype):
    """DeepSeek-V3 decode (batch 64 at 4k and 32k, the GPU check's shapes), a mixed prefill step,
    V2-Lite's 16 heads, and an fp8 cache forced to 16-bit words: each lowers for CUDA and its
    Triton module passes the MLIR verifier."""
    cases = [(deepseek_specs(64, 4096, cache_dtype), {}), (deepseek_specs(64, 32768, cache_dtype), {}),
             (deepseek_specs(16, 2048, cache_dtype, tokens=512), {}),
             (deepseek_specs(8, 1024, cache_dtype, num_heads=16, block_size=16), {})]
    if cache_dtype == FP8_DTYPE:
        cases.append((deepseek_specs(64, 4096, cache_dtype), dict(read_words=True)))
    for args, options in cases:
        with captured_triton_modules() as modules:
            _, names = lower_and_verify(lambda *a: mla_paged_attention_triton(
                *a[:6], kv_lora_rank=512, sm_scale=0.1, scale=a[6], **options), *args)
        assert len(names) == 1, names
        assert ("i16" in str(modules[0][1])) == bool(options.get("read_words")), options


def test_the_gpu_checks_mla_variants_lower_and_verify():
    """The MLA part's tuning variants (other head blocks, tiles, warps, splits) at its 4k shape."""
    from jaxserve.benchmarks.gpu_parts import MLA_VARIANTS

    for options in MLA_VARIANTS:
        _, names = lower_and_verify(lambda *a: mla_paged_attention_triton(
            *a[:6], kv_lora_rank=512, sm_scale=0.1, scale=a[6], **options), *deepseek_specs(64, 4096, jnp.bfloat16))
        assert len(names) == 1, options
