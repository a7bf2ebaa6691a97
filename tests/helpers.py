"""Test helpers: run a model on single sequences through the paged attention path."""

from __future__ import annotations

import weakref

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx

from models.kv_spec import allocate
from models.layers import AttentionMetadata
from models.registry import kv_spec


def empty_kv_caches(config, num_blocks, block_size, dtype=jnp.float32):
    return [allocate(layer, num_blocks, block_size, dtype) for layer in kv_spec(config).layers]


_STEPS: dict = {}  # graphdef -> its jitted forward, shared by every call on the same model
_STEPS_BY_MODEL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # unhashable graphs


def sequence_logits(model, token_ids, *, block_size=4, chunk=None):
    """Logits at every position of one sequence, fed in chunks of `chunk` tokens (all at once
    when None) through the paged KV cache, the block table deliberately non-contiguous. The cache
    and table are sized for the length rounded up to 64 tokens, so prompts of a fixture share
    their compiled steps."""
    config = model.config
    n = len(token_ids)
    room = -(-n // 64) * 64
    num_blocks = 2 * (room // block_size + 2) + 1
    table = np.arange(num_blocks - 1, 0, -2, dtype=np.int32)[: room // block_size + 1]  # reversed, gapped
    caches = empty_kv_caches(config, num_blocks, block_size)
    # The weights are an argument, not constants baked into the trace (slow to compile).
    graphdef, state = nnx.split(model)
    try:
        key, steps = graphdef, _STEPS
        step = steps.get(key)
    except TypeError:  # a graph with a dict attribute: one jit per model object
        key, steps = model, _STEPS_BY_MODEL
        step = steps.get(key)
    if step is None:
        step = steps[key] = jax.jit(lambda state, *args: _forward(nnx.merge(graphdef, state), *args))
    chunk = chunk or n
    out = []
    for start in range(0, n, chunk):
        ids = np.asarray(token_ids[start:start + chunk], np.int32)
        pos = np.arange(start, start + len(ids), dtype=np.int32)
        slots = table[pos // block_size] * block_size + pos % block_size
        meta = AttentionMetadata(
            slot_mapping=jnp.asarray(slots),
            query_start_loc=jnp.asarray([0, len(ids)], jnp.int32),
            seq_lens=jnp.asarray([start + len(ids)], jnp.int32),
            block_tables=jnp.asarray(table[None, :]),
            num_seqs=jnp.asarray(1, jnp.int32),
        )
        logits, caches = step(state, jnp.asarray(ids), jnp.asarray(pos), caches, meta)
        out.append(np.asarray(logits))
    return np.concatenate(out)


def _forward(model, ids, pos, caches, meta):
    hidden, caches = model(ids, pos, caches, meta)
    return model.compute_logits(hidden), caches


def relative_error(out, ref):
    """DESIGN.md's definition: max|out - ref| / max|ref|."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))


def run_parallel_worker(*selection: str, timeout: float = 1200) -> dict:
    """tests/jaxserve/parallel_worker.py's result for `selection` (its command-line arguments: models
    or groups, then cases), run in a subprocess with 8 fake CPU devices so that this process keeps
    its single device."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("XLA_FLAGS", None)  # the worker sets its own
    proc = subprocess.run([sys.executable, "-m", "tests.jaxserve.parallel_worker", *selection], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


# A forced EPLB placement over 8 slots of 6 experts: experts 0 and 2 replicated, every expert moved.
FORCED_PLACEMENT = {"phys_to_logical": np.array([2, 0, 3, 0, 1, 2, 5, 4], np.int32),
                    "replica_table": np.array([[1, 3, 1], [4, 4, 4], [0, 5, 0], [2, 2, 2], [7, 7, 7], [6, 6, 6]],
                                              np.int32),
                    "replica_count": np.array([2, 1, 2, 1, 1, 1], np.int32)}


def assert_eplb_moves_every_slot_param(model, prompt, monkeypatch) -> None:
    """Rebalance `model` (6 experts in 8 slots on one device) to FORCED_PLACEMENT through the EPLB
    hook: every expert parameter (weights, scales, biases: `Experts.slot_params`) lands in its
    expert's slots, and the logits of `prompt` stay the same."""
    from jaxserve import eplb
    from models.mesh import make_mesh, replicated
    from models.moe import moe_blocks

    before = sequence_logits(model, prompt)
    old = [[np.asarray(p[...]) for p in block.experts.slot_params()] for block in moe_blocks(model)]
    monkeypatch.setattr(eplb, "rebalance", lambda *args: FORCED_PLACEMENT)
    graphdef, params = nnx.split(model)
    hook = eplb.EplbHook(graphdef, params, window=1, interval=1, sharding=replicated(make_mesh()))
    moved = nnx.merge(graphdef, hook.rebalance_params(params))
    for block, values in zip(moe_blocks(moved), old):
        for param, value in zip(block.experts.slot_params(), values):
            np.testing.assert_array_equal(np.asarray(param[...]), value[FORCED_PLACEMENT["phys_to_logical"]])
    assert relative_error(sequence_logits(moved, prompt), before) < 1e-6
