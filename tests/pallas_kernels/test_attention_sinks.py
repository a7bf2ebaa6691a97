"""Learned attention sinks (gpt-oss) in every ragged paged attention backend, and the sliding
window around a page's size, against a float64 numpy attention with the sink in its softmax.

A sink is one more logit per query head that joins the softmax's denominator and attends to
nothing. The batches mix decodes and prefill chunks over 16-key pages; windows are smaller than
(5), equal to (16) and larger than (40) a page, and gpt-oss's 128 (over contexts up to 200).
Sinks are drawn from [-2, 5] against logits of about N(0, 1): large enough that counting one twice
(once per flash-decoding split, say) or dropping it moves the output by far more than the
tolerances.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.benchmarks.kernel_check import make_batch
from pallas_kernels import FP8_DTYPE, quantize_kv, ragged_paged_attention
from tests.pallas_kernels.test_ragged_paged_attention import naive_attention, rel_err

BLOCK = 16
WINDOWS = [None, 5, 16, 40, 128]
KINDS = ["f32", "bf16", "fp8"]
# Decodes at a page boundary and either side of it, prefill chunks (one from scratch, one
# continuing a prefix), and long decodes the 128-key window cuts.
Q_LENS = [1, 1, 1, 9, 20, 3, 1]
KV_LENS = [15, 16, 17, 9, 52, 150, 200]


def cache_kind(cache, kind):
    """(stored cache, its scale, the float64 view the numpy attention sees)."""
    if kind == "f32":
        return jnp.asarray(cache), None, np.asarray(cache, np.float64)
    if kind == "bf16":
        stored = jnp.asarray(cache, jnp.bfloat16)
        return stored, None, np.asarray(stored.astype(jnp.float32), np.float64)
    scale = float(np.abs(cache).max() / 448.0)
    stored = quantize_kv(jnp.asarray(cache), scale, FP8_DTYPE)
    return stored, jnp.float32(scale), np.asarray(stored.astype(jnp.float32), np.float64) * scale


def sink_case(kind, group, seed, *, q_dtype=jnp.float32, num_kv_heads=2, q_lens=Q_LENS, kv_lens=KV_LENS):
    """(args, options, numpy view of the inputs, live tokens) for a fresh random mixed batch with
    the null block and every stale slot poisoned with NaN, and random sinks."""
    rng = np.random.default_rng(seed)
    q, k, v, lens, tables, cu = make_batch(
        rng, q_lens, kv_lens, num_kv_heads=num_kv_heads, group=group, head_dim=64, block_size=BLOCK,
        width=-(-max(kv_lens) // BLOCK) + 1, pad_rows=1, pad_tokens=3)
    (k_cache, k_scale, k_view), (v_cache, v_scale, v_view) = cache_kind(k, kind), cache_kind(v, kind)
    k_cache, v_cache = np.array(k_cache), np.array(v_cache)
    for cache in (k_cache, v_cache):
        cache[0] = np.nan
        for s, kv_len in enumerate(kv_lens):
            cache[tables[s, (kv_len - 1) // BLOCK], (kv_len - 1) % BLOCK + 1:] = np.nan
    k_cache, v_cache = jnp.asarray(k_cache), jnp.asarray(v_cache)
    q = jnp.asarray(q, q_dtype)
    sinks = rng.uniform(-2.0, 5.0, q.shape[1]).astype(np.float32)
    args = (q, k_cache, v_cache, jnp.asarray(lens), jnp.asarray(tables), jnp.asarray(cu), jnp.int32(len(q_lens)))
    options = dict(sm_scale=0.125, k_scale=k_scale, v_scale=v_scale, sinks=jnp.asarray(sinks))
    view = (np.asarray(q.astype(jnp.float32), np.float64), k_view, v_view, lens, tables, cu, len(q_lens))
    return args, options, view, int(cu[len(q_lens)])


def expected(view, options, window, **sinks):
    """The numpy attention of a case; `sinks=` overrides the case's sinks (None: none)."""
    sinks = sinks.get("sinks", options["sinks"])
    return naive_attention(*view, sm_scale=options["sm_scale"], sliding_window=window,
                           sinks=None if sinks is None else np.asarray(sinks))


def check(out, ref, valid, tolerance):
    out = np.asarray(out, np.float64)
    assert np.all(np.isfinite(out)), "NaN/inf reached the output (null block or stale slots)"
    assert rel_err(out[:valid], ref[:valid]) < tolerance
    assert np.all(out[valid:] == 0), "padding rows must be zero"


# Reference --------------------------------------------------------------------------------------

@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("kind", KINDS)
def test_reference_sinks_and_windows(window, kind):
    group = {"f32": 1, "bf16": 4, "fp8": 8}[kind]
    args, options, view, valid = sink_case(kind, group, seed=WINDOWS.index(window) * 10 + KINDS.index(kind))
    out = ragged_paged_attention(*args, **options, sliding_window=window, backend="reference")
    # The numpy attention reads the same rounded cache; only float32 accumulation order differs.
    check(out, expected(view, options, window), valid, 1e-5)
    without = expected(view, options, window, sinks=None)
    assert rel_err(out[:valid], without[:valid]) > 1e-2, "the sinks must matter on these inputs"


@pytest.mark.parametrize("window", [None, 16, 40])
def test_reference_sinks_over_many_chunks_and_tiles(monkeypatch, window):
    """One page per key chunk and 16-query tiles: the sink joins after many online-softmax steps,
    and long prefill rows run as several tiles (the last one partial)."""
    import pallas_kernels.paged_attention as module

    monkeypatch.setattr(module, "_DECODE_CHUNK_KEYS", 1)
    monkeypatch.setattr(module, "_TILE_KEYS", 1)
    monkeypatch.setattr(module, "_TILE_QUERIES", 16)
    args, options, view, valid = sink_case("f32", 4, seed=3, q_lens=[1, 37, 1, 16, 2], kv_lens=[150, 121, 33, 16, 64])
    out = ragged_paged_attention(*args, **options, sliding_window=window, backend="reference")
    check(out, expected(view, options, window), valid, 1e-5)


def test_reference_sinks_are_runtime_arrays():
    """Sinks trace as an array argument: new values never retrace."""
    args, options, view, valid = sink_case("bf16", 4, seed=5)
    traces = []

    @jax.jit
    def attend(sinks):
        traces.append(1)
        return ragged_paged_attention(*args, **(options | dict(sinks=sinks)), backend="reference")

    for shift in (0.0, 3.0):
        sinks = options["sinks"] + shift
        check(attend(sinks), expected(view, options, None, sinks=sinks), valid, 1e-5)
    assert len(traces) == 1


def test_sinks_of_the_wrong_shape_name_the_field():
    args, options, _, _ = sink_case("f32", 2, seed=1)
    with pytest.raises(ValueError, match=r"sinks must have shape \(4,\)"):
        ragged_paged_attention(*args, **(options | dict(sinks=jnp.zeros(2))), backend="reference")


# Every backend ----------------------------------------------------------------------------------

def run_backend(backend, args, options, window, **kernel):
    """One backend's output (float64); the kernels in interpret mode, Mosaic GPU compiled once."""
    if backend == "reference":
        return np.asarray(ragged_paged_attention(*args, **options, sliding_window=window, backend=backend), np.float64)
    if backend == "triton":
        from pallas_kernels.triton_paged_attention import ragged_paged_attention_triton

        out = ragged_paged_attention_triton(*args, **options, sliding_window=window, interpret=True, **kernel)
        return np.asarray(out, np.float64)
    from jax.experimental.pallas import mosaic_gpu as plgpu

    from pallas_kernels.mosaic_paged_attention import ragged_paged_attention_mosaic
    from tests.pallas_kernels.test_mosaic_paged_attention import FAST_COMPILE

    def attend(*arrays, k_scale, v_scale, sinks):
        return ragged_paged_attention_mosaic(*arrays, **(options | dict(k_scale=k_scale, v_scale=v_scale, sinks=sinks)),
                                             sliding_window=window, interpret=plgpu.InterpretGPUParams(), **kernel)

    arrays = dict(k_scale=options["k_scale"], v_scale=options["v_scale"], sinks=options["sinks"])
    compiled = jax.jit(attend).lower(*args, **arrays).compile(FAST_COMPILE)
    return np.asarray(compiled(*args, **arrays), np.float64)
