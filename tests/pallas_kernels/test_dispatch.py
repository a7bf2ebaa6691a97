"""Which kernel runs, and the reason the engine logs for it (pallas_kernels/dispatch.py)."""

import importlib

import jax.numpy as jnp
import pytest

from pallas_kernels import dispatch
from pallas_kernels.dispatch import choose_attention_kernel, choose_moe_kernel

GQA = dict(num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16, q_dtype=jnp.bfloat16,
           cache_dtype=jnp.bfloat16)
HOPPER = dict(capability=(9, 0), platform="gpu")


def test_pallas_means_mosaic_on_hopper_and_triton_elsewhere():
    choice = choose_attention_kernel("pallas", **GQA, **HOPPER)
    assert choice == dispatch.KernelChoice("mosaic", "Mosaic GPU on sm_90: Mosaic GPU first ('pallas')")
    for capability in ((8, 0), (10, 0)):  # Ampere; Blackwell has no wgmma
        other = choose_attention_kernel("pallas", **GQA, capability=capability, platform="gpu")
        assert other.backend == "triton", other
        assert f"need Hopper (sm_90), this is sm_{capability[0]}0" in other.reason


def test_auto_takes_the_kernel_measured_fastest_on_the_card():
    assert dispatch.MEASURED_FASTEST[9] == {"attention": "triton", "moe": "triton"}
    choice = choose_attention_kernel("auto", **GQA, **HOPPER)
    assert choice.backend == "triton" and "measured fastest on sm_90" in choice.reason
    moe = choose_moe_kernel("auto", hidden_size=2048, intermediate_size=768, num_experts=128, dtype=jnp.bfloat16,
                            **HOPPER)
    assert moe.backend == "triton"
    # A shape the fastest kernel cannot take falls to the other, saying why.
    fallback = choose_moe_kernel("auto", hidden_size=2048, intermediate_size=760, num_experts=8, dtype=jnp.bfloat16,
                                 **HOPPER)
    assert fallback.backend == "reference" and "Triton: intermediate_size (760)" in fallback.reason
    unmeasured = choose_attention_kernel("auto", **GQA, capability=(12, 0), platform="gpu")
    assert unmeasured.backend == "triton" and "no measurement on sm_120" in unmeasured.reason


def test_a_shape_mosaic_cannot_take_falls_back_to_triton_with_its_reason():
    f32 = {**GQA, "q_dtype": jnp.float32, "cache_dtype": jnp.float32}
    choice = choose_attention_kernel("pallas", **f32, **HOPPER)
    from pallas_kernels.mosaic_paged_attention import mosaic_unsupported_reason

    reason = mosaic_unsupported_reason(**{k: jnp.dtype(v) if "dtype" in k else v for k, v in f32.items()})
    assert choice.backend == "triton" and reason and reason in choice.reason


def test_a_kernel_that_does_not_import_is_reported(monkeypatch):
    real = importlib.import_module

    def missing(name, *args):
        if name.startswith("pallas_kernels.mosaic") or name == "pallas_kernels.triton_paged_attention":
            raise ImportError(f"cannot import name 'triton' from {name}")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", missing)
    choice = choose_attention_kernel("pallas", **GQA, **HOPPER)
    assert choice.backend == "reference" and choice.reason.count("does not import here") == 2


def test_auto_is_the_reference_without_a_gpu():
    choice = choose_attention_kernel("auto", **GQA)
    assert choice.backend == "reference" and "no GPU" in choice.reason
    assert choose_attention_kernel("reference", **GQA, **HOPPER).reason == "requested"


def test_an_explicit_kernel_that_cannot_take_the_shape_is_an_error():
    with pytest.raises(ValueError, match="attention_backend='triton' cannot run this model: head_dim 8"):
        choose_attention_kernel("triton", **{**GQA, "head_dim": 8})
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        choose_attention_kernel("flash", **GQA)
    with pytest.raises(ValueError, match="moe_backend='triton' cannot run this model: intermediate_size"):
        choose_moe_kernel("triton", hidden_size=64, intermediate_size=40, num_experts=4, dtype=jnp.bfloat16)


def test_the_engine_config_takes_the_same_backends():
    from jaxserve.config import ATTENTION_BACKENDS

    assert ATTENTION_BACKENDS == dispatch.BACKENDS
