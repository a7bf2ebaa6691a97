"""The block-scaled FP8 matmul (pallas_kernels/triton_fp8_matmul.py): interpret mode against the
pure-JAX reference of the same math at ragged shapes; CUDA lowering and the MLIR verifier at
DeepSeek-V3's shapes (no GPU needed); the "pallas" and "auto" methods of
models.quantization.block_fp8_matmul and the dispatch's choice."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.quantization import BlockFP8, block_fp8_matmul, quantize, quantize_activations
from pallas_kernels.dispatch import choose_fp8_matmul_kernel
from pallas_kernels.interpret import interpret_mode
from pallas_kernels.triton_fp8_matmul import (
    FP8, block_fp8_matmul_reference, block_fp8_matmul_triton, default_blocks, unsupported_reason)
from tests.pallas_kernels.cuda_lowering import captured_triton_modules, lower_and_verify

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
spec = jax.ShapeDtypeStruct


def operands(m: int, k: int, n: int, seed: int = 0):
    """Quantized activations and weights whose group and block scales vary over ~3 decades (each
    group and block scaled differently), so a scale applied to the wrong block shows."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)) * np.repeat(10.0 ** rng.uniform(-1.5, 1.5, (m, -(-k // 128))), 128, 1)[:, :k]
    w = rng.standard_normal((k, n)) * np.repeat(np.repeat(10.0 ** rng.uniform(-1.5, 1.5, (-(-k // 128), -(-n // 128))),
                                                          128, 0), 128, 1)[:k, :n]
    xq, xs = quantize_activations(jnp.asarray(x, jnp.float32), 128)
    wq, ws = quantize(jnp.asarray(w, jnp.float32), (128, 128))
    return xq[:, :k], xs, wq, ws


# (M, K, N, options): ragged M, N and K (K = 300: a short last group, zero-padded), a single token
# and a K under one group; block_n 32/64/128 (one weight scale per step) and 256 (a gather of two);
# K splits that share the steps evenly (4 / 2) and not (3 steps over 2 splits); weights [N, K].
CASES = [
    (40, 300, 200, dict(block_m=16, block_n=64)),
    (40, 300, 200, dict(block_m=32, block_n=256, k_splits=2)),
    (1, 40, 5, dict(block_m=16, block_n=16)),
    (33, 512, 130, dict(block_m=16, block_n=128, k_splits=2)),
    (17, 384, 96, dict(block_m=16, block_n=32, k_splits=2, w_transposed=True)),
]


@pytest.mark.parametrize("m,k,n,options", CASES)
@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_matches_the_reference_in_interpret_mode(m, k, n, options, out_dtype):
    xq, xs, wq, ws = operands(m, k, n, seed=m + k + n)
    w = wq.T if options.get("w_transposed") else wq
    out = block_fp8_matmul_triton(xq, xs, w, ws, out_dtype=out_dtype, interpret=True, **options)
    ref = np.asarray(block_fp8_matmul_reference(xq, xs, wq, ws, out_dtype=jnp.float32))
    magnitude = np.asarray(block_fp8_matmul_reference(jnp.abs(xq), xs, jnp.abs(wq), jnp.abs(ws), out_dtype=jnp.float32))
    assert out.shape == (m, n) and out.dtype == out_dtype
    # Per element: the products of e4m3 values are exact in float32 and only their summation order
    # differs, an error bounded by a few ulps of sum |x_k w_k| (`magnitude`; the outputs cancel to
    # far less: the scales span 3 decades); bfloat16 adds one rounding of the result
    # (7 fraction bits: half an ulp is at most 2^-8 of the value).
    rounding = 0.0 if out_dtype == jnp.float32 else 2.0**-8
    err = np.abs(np.asarray(out, np.float32) - ref)
    assert np.all(err <= 1e-6 * magnitude + rounding * np.abs(ref)), float(np.max(err / magnitude))


def test_default_blocks_fill_the_gpu_at_decode_and_not_in_interpret_mode():
    decode = default_blocks(64, 2048, 7168)  # expert_up at 64 tokens: 16 tiles, K split 8 ways
    assert decode == dict(block_m=64, block_n=128, num_warps=4, num_stages=4, k_splits=8)
    assert default_blocks(4096, 2048, 7168)["k_splits"] == 1 and default_blocks(4096, 1, 1)["block_m"] == 128
    assert default_blocks(64, 2048, 7168, interpret=True)["k_splits"] == 1
    assert default_blocks(3, 32768, 512) == dict(block_m=16, block_n=128, num_warps=4, num_stages=4, k_splits=1)


def test_bad_arguments_name_the_field():
    xq, xs, wq, ws = operands(4, 256, 128)
    with pytest.raises(ValueError, match=r"x_scale must have shape \(4, 2\)"):
        block_fp8_matmul_triton(xq, xs[:, :1], wq, ws, interpret=True)
    with pytest.raises(ValueError, match=r"w_scale must have shape \(2, 1\)"):
        block_fp8_matmul_triton(xq, xs, wq, ws.T, interpret=True)
    with pytest.raises(ValueError, match=r"w_fp8's K \(128, rows\)"):
        block_fp8_matmul_triton(xq, xs, wq[:128], ws, interpret=True)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        block_fp8_matmul_triton(xq.astype(jnp.bfloat16), xs, wq, ws, interpret=True)
    with pytest.raises(ValueError, match="block_k must be 128"):
        block_fp8_matmul_triton(xq, xs, wq, ws, block_k=64, interpret=True)
    with pytest.raises(ValueError, match="block_n must be a power of two >= 16, got 48"):
        block_fp8_matmul_triton(xq, xs, wq, ws, block_n=48, interpret=True)


def test_unsupported_reasons():
    assert unsupported_reason(k_dim=7168, n_dim=2048) is None
    assert unsupported_reason(k_dim=7168, n_dim=2048, capability=(9, 0)) is None
    assert "sm_89 or newer" in unsupported_reason(k_dim=7168, n_dim=2048, capability=(8, 0))
    assert "128 x 128" in unsupported_reason(k_dim=7168, n_dim=2048, weight_block=(64, 32))
    assert "float64" in unsupported_reason(k_dim=128, n_dim=128, dtype=jnp.float64)
    assert "32-bit offsets" in unsupported_reason(k_dim=2**16, n_dim=2**15)


# DeepSeek-V3's block-FP8 linears (K, N): an expert's up (gate/up alike) and down, q_b_proj,
# kv_b_proj and o_proj.
DEEPSEEK_SHAPES = [(7168, 2048), (2048, 7168), (1536, 24576), (512, 32768), (16384, 7168)]


def _fp8_specs(m, k, n, w_transposed=False):
    g = -(-k // 128)
    w = spec((n, k) if w_transposed else (k, n), FP8)
    return spec((m, k), FP8), spec((m, g), jnp.float32), w, spec((g, -(-n // 128)), jnp.float32)


@pytest.mark.parametrize("m", [64, 4096])
def test_deepseek_shapes_lower_for_cuda_and_verify(m):
    """Lowered for CUDA and every Triton module through the MLIR verifier; the dot takes fp8
    operands (an fp8 MMA, not a conversion to bf16) and accumulates in float32."""
    for k, n in DEEPSEEK_SHAPES:
        for w_transposed in (False, True):
            with captured_triton_modules() as modules:
                _, names = lower_and_verify(lambda *a: block_fp8_matmul_triton(*a, w_transposed=w_transposed),
                                            *_fp8_specs(m, k, n, w_transposed))
            assert len(names) == 1, names
            dots = [line for line in str(modules[0][1]).splitlines() if "tt.dot" in line]
            assert len(dots) == 1 and "xf8E4M3FN> * tensor<" in dots[0] and "xf32>" in dots[0], dots


def test_ragged_split_and_gathered_scales_lower_and_verify():
    """The code paths DeepSeek's shapes do not take: ragged M/N/K edges (masked loads and stores,
    a padded K), an uneven K split (a dynamic trip count), block_n 256 (gathered weight scales)."""
    for m, k, n, options in [(40, 300, 200, {}), (64, 2048, 7168, dict(k_splits=3)),
                             (256, 1536, 1000, dict(block_n=256, num_warps=8))]:
        _, names = lower_and_verify(lambda *a: block_fp8_matmul_triton(*a, **options), *_fp8_specs(m, k, n))
        assert len(names) == 1


# ---- through models.quantization and the dispatch ----

def test_the_pallas_method_matches_the_scaled_method():
    """Both quantize the activations the same way and apply the same scales: they differ by float32
    summation order only, at any leading shape and a ragged K and N."""
    quant = BlockFP8((128, 128))
    key = jax.random.key(5)
    kernel, scale = quantize(0.05 * jax.random.normal(key, (300, 200)), quant.kernel_block)
    x = jax.random.normal(jax.random.fold_in(key, 1), (2, 7, 300))
    with interpret_mode():
        out = jax.jit(lambda *a: block_fp8_matmul(*a, quant, "pallas"))(x, kernel, scale)
    want = block_fp8_matmul(x, kernel, scale, quant, "scaled")
    assert out.shape == (2, 7, 200) and out.dtype == x.dtype
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(want))))


def test_auto_dequantizes_without_a_gpu_and_pallas_refuses_blocks_it_cannot_take():
    quant = BlockFP8((128, 128))
    kernel, scale = quantize(jax.random.normal(jax.random.key(0), (256, 128)), quant.kernel_block)
    x = jax.random.normal(jax.random.key(1), (3, 256))
    assert quant.matmul == "auto"
    np.testing.assert_array_equal(np.asarray(block_fp8_matmul(x, kernel, scale, quant)),
                                  np.asarray(block_fp8_matmul(x, kernel, scale, quant, "dequantize")))
    small = BlockFP8((32, 64))
    kernel, scale = quantize(jax.random.normal(jax.random.key(0), (256, 128)), small.kernel_block)
    with pytest.raises(ValueError, match="weight blocks must be 128 x 128"):
        block_fp8_matmul(x, kernel, scale, small, "pallas")
    with pytest.raises(ValueError, match="method must be one of"):
        block_fp8_matmul(x, kernel, scale, small, "cutlass")


def test_dispatch_prefers_the_kernel_on_gpus_with_fp8_dots():
    shape = dict(k_dim=7168, n_dim=2048, weight_block=(128, 128), dtype=jnp.bfloat16)
    hopper = choose_fp8_matmul_kernel("auto", **shape, capability=(9, 0), platform="gpu")
    assert hopper.backend == "triton" and "no measurement on sm_90" in hopper.reason
    assert choose_fp8_matmul_kernel("auto", **shape, capability=None, platform="cpu").backend == "reference"
    ampere = choose_fp8_matmul_kernel("auto", **shape, capability=(8, 0), platform="gpu")
    assert ampere.backend == "reference" and "fp8 dots need sm_89 or newer" in ampere.reason
    blocks = choose_fp8_matmul_kernel("auto", **{**shape, "weight_block": (64, 64)}, capability=(9, 0), platform="gpu")
    assert blocks.backend == "reference" and "128 x 128" in blocks.reason
    assert choose_fp8_matmul_kernel("pallas", **shape, capability=(9, 0), platform="gpu").backend == "triton"
    with pytest.raises(ValueError, match="no Mosaic GPU block-FP8 matmul"):
        choose_fp8_matmul_kernel("mosaic", **shape, capability=(9, 0), platform="gpu")


# ---- the GPU check's part and report ----

def test_the_gpu_checks_fp8_matmul_part_times_the_kernel_at_tiny_sizes(tmp_path):
    """`make gpu-check`'s fp8_matmul part on CPU (the kernel in interpret mode): the Pallas methods
    timed beside the others and as close to the bf16 product as the XLA scaled one."""
    import json

    from jaxserve.benchmarks import gpu_parts

    out = tmp_path / "fp8_matmul.json"
    assert gpu_parts.main(["fp8_matmul", "--out", str(out), "--seconds", "60", "--tiny"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [row["tokens"] for row in rows] == [8, 40]
    for row in rows:
        assert all(row[f"{method}_ms"] > 0 for method in ("bf16", "dequantize", "scaled", "pallas", "pallas_nk")), row
        for method in ("pallas", "pallas_nk"):  # the same activation rounding as "scaled": e4m3, ~3%
            assert abs(row[f"{method}_rel_err"] - row["scaled_rel_err"]) < 1e-3, row


def test_the_report_shows_the_kernel_and_judges_it_with_the_other_methods():
    from jaxserve.benchmarks import gpu_report

    row = dict(shape="o_proj", tokens=4096, k=16384, n=7168, dequantize_ms=3.0, dequantize_frac_fp8=0.3,
               dequantize_rel_err=1e-3, scaled_ms=5.0, scaled_frac_fp8=0.2, scaled_rel_err=2e-2, pallas_ms=1.4,
               pallas_frac_fp8=0.65, pallas_rel_err=2e-2, pallas_nk_ms=1.2, pallas_nk_frac_fp8=0.75,
               pallas_nk_rel_err=2e-2)
    results = {"parts": {"fp8_matmul": {"status": "ok", "seconds": 1, "result": {"rows": [row]}}}}
    met = {target: (measured, ok) for target, measured, ok in gpu_report.targets(results)}
    # The [N, K] layout is shown, not judged: the model's layers keep [K, N].
    assert met["block-FP8 matmul >= 60% of the dense fp8 rate (DeepSeek-V3 shapes, >= 1024 tokens)"] == (
        "65% to 65% over 1 rows (best method per row)", True)
    assert ("| o_proj | 4096 | 16384 x 7168 | - | 3.000 (30% fp8, 1e-03) | 5.000 (20% fp8, 2e-02) | "
            "1.400 (65% fp8, 2e-02) | 1.200 (75% fp8, 2e-02) |") in gpu_report.markdown(results)


def test_the_pallas_method_lowers_for_cuda_with_its_activation_quantization():
    """What a kept layer traces on a GPU: bf16 activations with leading axes, quantized in XLA, then
    the kernel (one verified Triton module)."""
    quant = BlockFP8((128, 128))
    x, kernel, scale = spec((2, 32, 7168), jnp.bfloat16), spec((7168, 2048), FP8), spec((56, 16), jnp.float32)
    text, names = lower_and_verify(lambda *a: block_fp8_matmul(*a, quant, "pallas"), x, kernel, scale)
    assert len(names) == 1 and "tensor<2x32x2048xbf16>" in text
