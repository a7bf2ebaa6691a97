"""The kernel backends, as `attention_backend=` and the kernels' `backend=` take them (what each
one means and when it runs: pallas_kernels/dispatch.py).

Imports nothing, so the engine's options (jaxserve/config.py) validate against this list without
importing jax."""

BACKENDS = ("auto", "reference", "triton", "mosaic", "pallas")
