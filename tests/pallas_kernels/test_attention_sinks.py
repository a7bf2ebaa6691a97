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
from pallas_kernels import FP8_DTYPE, ragged_paged_attention
from tests.pallas_kernels.test_ragged_paged_attention import naive_attention, rel_err
from tests.pallas_kernels.test_triton_paged_attention import cast_cache

BLOCK = 16
WINDOWS = [None, 5, 16, 40, 128]
KINDS = ["f32", "bf16", "fp8"]
# Decodes at a page boundary and either side of it, prefill chunks (one from scratch, one
# continuing a prefix), and long decodes the 128-key window cuts.
Q_LENS = [1, 1, 1, 9, 20, 3, 1]
KV_LENS = [15, 16, 17, 9, 52, 150, 200]


def sink_case(kind, group, seed, *, q_dtype=jnp.float32, num_kv_heads=2, q_lens=Q_LENS, kv_lens=KV_LENS):
    """(args, options, numpy view of the inputs, live tokens) for a fresh random mixed batch with
    the null block and every stale slot poisoned with NaN, and random sinks."""
    rng = np.random.default_rng(seed)
    q, k, v, lens, tables, cu = make_batch(
        rng, q_lens, kv_lens, num_kv_heads=num_kv_heads, group=group, head_dim=64, block_size=BLOCK,
        width=-(-max(kv_lens) // BLOCK) + 1, pad_rows=1, pad_tokens=3)
    (k_cache, k_scale, k_view), (v_cache, v_scale, v_view) = cast_cache(k, kind), cast_cache(v, kind)
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


# (window, cache, GQA group, KV splits): every window with every cache kind; splits of 3 check that
# the flash-decoding merge counts each sink once.
TRITON_CASES = [(window, kind, (1, 4, 8)[(i + j) % 3], 1 + 2 * ((i + j) % 2))
                for i, window in enumerate(WINDOWS) for j, kind in enumerate(KINDS)]
# Mosaic GPU interpret mode costs seconds per case: every window, both of its cache kinds, both
# split counts, groups 1 to 8.
MOSAIC_CASES = [(None, "bf16", 8, 3), (5, "fp8", 4, 1), (16, "bf16", 1, 3), (40, "fp8", 8, 3), (128, "bf16", 4, 1)]


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
@pytest.mark.parametrize("window,kind,group,splits", TRITON_CASES)
def test_triton_sinks_and_windows(window, kind, group, splits):
    args, options, view, valid = sink_case(kind, group, seed=10 * WINDOWS.index(window) + KINDS.index(kind))
    out = run_backend("triton", args, options, window, num_kv_splits=splits)
    # q is float32 here, so the kernel's dots run in float32 on the same rounded cache values.
    check(out, expected(view, options, window), valid, 1e-4)


@pytest.mark.parametrize("window,kind,group,splits", MOSAIC_CASES)
def test_mosaic_sinks_and_windows(window, kind, group, splits):
    args, options, view, valid = sink_case(kind, group, seed=7 + WINDOWS.index(window), q_dtype=jnp.bfloat16)
    out = run_backend("mosaic", args, options, window, num_kv_splits=splits)
    # bf16 query, probabilities and outputs (test_mosaic_paged_attention.TOLERANCE).
    check(out, expected(view, options, window), valid, 1e-2)


BACKENDS = [pytest.param("reference"),
            pytest.param("triton", marks=pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")),
            pytest.param("mosaic")]
SMALL = dict(q_lens=[1, 9, 1], kv_lens=[17, 40, 100])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_dominant_sink_silences_the_output(backend):
    """Sinks of +20 against logits of about N(0, 1): e^20 outweighs every key, the output is ~0 (and
    still the softmax's, relatively), and nothing overflows."""
    args, options, view, valid = sink_case("bf16", 4, seed=17, q_dtype=jnp.bfloat16, **SMALL)
    options = options | dict(sinks=jnp.full(options["sinks"].shape, 20.0))
    out = run_backend(backend, args, options, 40, **({} if backend == "reference" else dict(num_kv_splits=3)))
    ref = expected(view, options, 40)
    assert np.max(np.abs(ref)) < 1e-5
    check(out, ref, valid, 1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinks_of_minus_infinity_change_nothing(backend):
    """A sink of -inf adds e^-inf = 0 to the denominator and leaves the max alone: bit for bit the
    output without sinks (which runs the code that ran before sinks existed)."""
    args, options, _, _ = sink_case("bf16", 4, seed=19, q_dtype=jnp.bfloat16, **SMALL)
    kernel = {} if backend == "reference" else dict(num_kv_splits=3)
    with_sinks = run_backend(backend, args, options | dict(sinks=jnp.full(options["sinks"].shape, -jnp.inf)), 16,
                             **kernel)
    without = run_backend(backend, args, options | dict(sinks=None), 16, **kernel)
    np.testing.assert_array_equal(with_sinks, without)


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
def test_the_entry_point_passes_sinks_to_the_kernel():
    args, options, view, valid = sink_case("bf16", 8, seed=23, **SMALL)
    out = ragged_paged_attention(*args, **options, sliding_window=16, backend="triton", interpret=True)
    check(out, expected(view, options, 16), valid, 1e-4)


# CUDA lowering at gpt-oss-120b's attention shape ------------------------------------------------

GPT_OSS_120B = dict(num_q_heads=64, num_kv_heads=8, head_dim=64, block_size=16)


def gpt_oss_specs(kind, num_tokens, num_seqs, context):
    """Abstract arguments of one step at gpt-oss-120b's shape, sinks last: no memory."""
    spec = jax.ShapeDtypeStruct
    heads, kv_heads, head_dim, block = (GPT_OSS_120B[k] for k in ("num_q_heads", "num_kv_heads", "head_dim", "block_size"))
    width = -(-context // block)
    cache = spec((num_seqs * width + 1, block, kv_heads, head_dim), FP8_DTYPE if kind == "fp8" else jnp.bfloat16)
    return (spec((num_tokens, heads, head_dim), jnp.bfloat16), cache, cache, spec((num_seqs,), jnp.int32),
            spec((num_seqs, width), jnp.int32), spec((num_seqs + 1,), jnp.int32), spec((), jnp.int32),
            spec((), jnp.float32), spec((heads,), jnp.float32))


# (name, cache, tokens, sequences, context, KV splits): a 64-sequence decode at 4k, split and not,
# and a mixed 256-token step (a prefill chunk beside decodes).
GPT_OSS_STEPS = [("decode-b64-4k", "bf16", 64, 64, 4096, None), ("decode-b64-4k-split4", "bf16", 64, 64, 4096, 4),
                 ("decode-b64-4k-fp8", "fp8", 64, 64, 4096, None), ("mixed-256", "bf16", 256, 16, 4096, None)]


def gpt_oss_attention(kernel, window, splits):
    def attend(*a):
        return kernel(*a[:7], sm_scale=GPT_OSS_120B["head_dim"] ** -0.5, sliding_window=window, k_scale=a[7],
                      v_scale=a[7], sinks=a[8], num_kv_splits=splits)

    return attend


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
@pytest.mark.parametrize("window", [128, None])
def test_triton_sinks_lower_and_verify_at_gpt_oss_shape(window):
    from pallas_kernels.triton_paged_attention import ragged_paged_attention_triton
    from tests.pallas_kernels.cuda_lowering import lower_and_verify

    for name, kind, tokens, seqs, context, splits in GPT_OSS_STEPS:
        fn = gpt_oss_attention(ragged_paged_attention_triton, window, splits)
        _, names = lower_and_verify(fn, *gpt_oss_specs(kind, tokens, seqs, context))
        assert len(names) == 1, (name, names)


@pytest.mark.parametrize("window", [128, None])
def test_mosaic_sinks_lower_at_gpt_oss_shape(window):
    from pallas_kernels.mosaic_paged_attention import ragged_paged_attention_mosaic
    from tests.pallas_kernels.mosaic_attention_cases import lower_mosaic_for_cuda

    for name, kind, tokens, seqs, context, splits in GPT_OSS_STEPS:
        fn = gpt_oss_attention(ragged_paged_attention_mosaic, window, splits)
        _, modules = lower_mosaic_for_cuda(fn, *gpt_oss_specs(kind, tokens, seqs, context))
        assert modules >= 1, name
