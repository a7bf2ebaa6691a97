"""Expert-parallel token dispatch strategies, as `expert_dispatch=` takes them (what each does:
models/expert_parallel.py).

Imports nothing, so the engine's options (jaxserve/config.py) validate against this list without
importing jax."""

STRATEGIES = ("allgather", "all_to_all")
