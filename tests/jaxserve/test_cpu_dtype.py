"""dtype="auto" on CPU: bfloat16 where the CPU has bf16 matrix units, float32 elsewhere, the
environment override, and the start-up log line that says which and why."""

import logging

import jax.numpy as jnp
import pytest

from jaxserve.cpu_dtype import CPU_DTYPE_ENV, auto_dtype, cpu_bf16_units
from jaxserve.engine import resolve_dtype

FLAGS = "flags\t\t: fpu vme sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"


def test_bf16_units_are_read_from_cpuinfo(tmp_path):
    with_units, without = tmp_path / "with", tmp_path / "without"
    with_units.write_text("processor\t: 0\n" + FLAGS + "processor\t: 1\n" + FLAGS)
    without.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    assert cpu_bf16_units(str(with_units)) == ("avx512_bf16", "amx_bf16")
    assert cpu_bf16_units(str(without)) == ()
    assert cpu_bf16_units(str(tmp_path / "missing")) == ()  # not Linux: no flags, float32


def test_auto_follows_the_cpu_units_unless_overridden(monkeypatch):
    monkeypatch.delenv(CPU_DTYPE_ENV, raising=False)
    name, why = auto_dtype("cpu", units=("avx512_bf16",))
    assert name == "bfloat16" and "avx512_bf16" in why
    name, why = auto_dtype("cpu", units=())
    assert name == "float32" and "no bf16" in why
    assert auto_dtype("gpu", units=())[0] == "bfloat16"  # accelerators: bf16 whatever the host CPU
    monkeypatch.setenv(CPU_DTYPE_ENV, "auto")
    assert auto_dtype("cpu", units=("amx_bf16",))[0] == "bfloat16"
    monkeypatch.setenv(CPU_DTYPE_ENV, "float32")
    assert auto_dtype("cpu", units=("amx_bf16",)) == ("float32", f"{CPU_DTYPE_ENV}=float32")
    monkeypatch.setenv(CPU_DTYPE_ENV, "bfloat16")
    assert auto_dtype("cpu", units=())[0] == "bfloat16"
    assert auto_dtype("tpu", units=())[0] == "bfloat16"  # the override is a CPU setting
    monkeypatch.setenv(CPU_DTYPE_ENV, "fp16")
    with pytest.raises(ValueError, match=f"{CPU_DTYPE_ENV} must be float32, bfloat16 or auto, got 'fp16'"):
        auto_dtype("cpu", units=())


def test_resolve_dtype_logs_the_choice(monkeypatch, caplog):
    monkeypatch.setenv(CPU_DTYPE_ENV, "bfloat16")
    with caplog.at_level(logging.INFO, logger="jaxserve.engine"):
        assert resolve_dtype("auto", log=True) == jnp.bfloat16
    assert any(f"dtype auto: bfloat16 ({CPU_DTYPE_ENV}=bfloat16)" in r.getMessage() for r in caplog.records)
    assert resolve_dtype("float32") == jnp.float32  # an explicit dtype is taken as given
