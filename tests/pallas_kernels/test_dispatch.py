"""Which kernel runs, and the reason the engine logs for it (pallas_kernels/dispatch.py)."""

import jax.numpy as jnp
import pytest

from pallas_kernels import dispatch
from pallas_kernels.dispatch import choose_attention_kernel, choose_moe_kernel

GQA = dict(num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16, q_dtype=jnp.bfloat16,
           cache_dtype=jnp.bfloat16)


def test_pallas_prefers_mosaic_on_hopper_and_triton_elsewhere():
    assert choose_attention_kernel("pallas", **GQA, capability=(9, 0)) == dispatch.KernelChoice(
        "mosaic", "Mosaic GPU on sm_90")
    for capability in ((8, 0), (10, 0)):  # Ampere; Blackwell has no wgmma
        other = choose_attention_kernel("pallas", **GQA, capability=capability)
        assert other.backend == "triton", other
        assert f"need Hopper (sm_90), this is sm_{capability[0]}0" in other.reason


def test_a_shape_mosaic_cannot_take_falls_back_to_triton_with_its_reason():
    choice = choose_attention_kernel("pallas", **{**GQA, "q_dtype": jnp.float32, "cache_dtype": jnp.float32},
                                     capability=(9, 0))
    reason = dispatch._mosaic_reason("mosaic_paged_attention", **{**GQA, "q_dtype": jnp.dtype(jnp.float32),
                                                                   "cache_dtype": jnp.dtype(jnp.float32)})
    assert choice.backend == "triton" and reason and reason in choice.reason


def test_a_mosaic_kernel_that_does_not_import_is_reported(monkeypatch):
    import importlib

    real = importlib.import_module

    def missing(name, *args):
        if name.startswith("pallas_kernels.mosaic"):
            raise ImportError(f"cannot import name 'tcgen05' from {name}")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", missing)
    choice = choose_attention_kernel("pallas", **GQA, capability=(9, 0))
    assert choice.backend == "triton" and "does not import here" in choice.reason


def test_auto_is_the_reference_without_a_gpu():
    choice = choose_attention_kernel("auto", **GQA)
    assert choice.backend == "reference" and "no GPU" in choice.reason
    assert choose_attention_kernel("reference", **GQA, capability=(9, 0)).reason == "requested"


def test_an_explicit_kernel_that_cannot_take_the_shape_is_an_error():
    with pytest.raises(ValueError, match="attention_backend='triton' cannot run this model: head_dim 8"):
        choose_attention_kernel("triton", **{**GQA, "head_dim": 8})
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        choose_attention_kernel("flash", **GQA)
    with pytest.raises(ValueError, match="moe_backend='triton' cannot run this model: intermediate_size"):
        choose_moe_kernel("triton", hidden_size=64, intermediate_size=40, num_experts=4, dtype=jnp.bfloat16)


def test_no_kernel_takes_the_shape_then_the_reference_says_why():
    choice = choose_moe_kernel("pallas", hidden_size=64, intermediate_size=40, num_experts=4, dtype=jnp.float32,
                               capability=(9, 0))
    assert choice.backend == "reference" and "Triton: intermediate_size (40)" in choice.reason


def test_the_engine_config_takes_the_same_backends():
    from jaxserve.config import ATTENTION_BACKENDS

    assert ATTENTION_BACKENDS == dispatch.BACKENDS
