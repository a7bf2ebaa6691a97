"""The "eagle3" and "mtp" proposers: a draft head that runs on device, inside each step, on the
target's hidden states.

A draft head (models/eagle3.py `Eagle3Head`, models/deepseek.py `MTPLayer`) is one decoder layer
with a KV cache layer of its own, in the target's blocks (group 0's table and slots: the head's
cache for position p sits where the target's is). At position p it reads a feature (from the
target: EAGLE-3's three captured residual streams through `fc`, MTP's final hidden state) and
the token at p + 1, and its output drafts the token at p + 2. Each step, after the verifier:

1. **Catch-up pass** over the step's tokens: position p of a row gets the target's feature at p
   and the token at p + 1, read from the token history that the sampler has just written (a
   prompt's next token, a verified draft, or the row's new token). Writes the head's cache.
2. The hidden state at each row's last verified position (its last token, or with drafts the
   last accepted one) drafts token 1.
3. **k - 1 draft steps**, one token per row: the head's own hidden state is the next feature,
   its draft the next token, its keys written one position further, into a copy of the rows'
   blocks (`_rows_cache`): they matter only within the step.

Positions past a row's accepted tokens (rejected drafts) hold stale head cache entries: each later
step's catch-up pass rewrites them before anything reads them. The copy of the rows' blocks costs
each step R x (max_model_len / block_size) blocks of the head's one layer (a row's whole table
width): small on a CPU's budgets, and the thing to revisit for long contexts on a GPU. Drafts are the head's argmax
(one-hot), so verification is exact. The head's cache is the head's alone: prefix-cache hits
reuse it as written (a hit's last position may have seen another next token), and KV connectors
(host tier, disaggregation) do not move it. Neither changes an output, only how many drafts are
accepted.

Async scheduling: the drafts come out of the step itself (no host proposal, no second device
round trip), but the next step still needs them on the host to be scheduled, so a speculating
engine processes step N before it schedules N + 1, as for the host proposers.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.token_rows import token_rows
from jaxserve.spec_decode.proposer import Proposal, Proposer
from models.kv_spec import KVCache, allocate
from models.layers import AttentionMetadata
from models.mesh import shard_state


class DraftHead:
    """The device side: the head's parameters and cache, and the jitted program of steps 1-3.
    `head`: an `Eagle3Head` (method "eagle3"), or None for "mtp" (the target's `mtp[0]`)."""

    def __init__(self, runner, method: str, head: nnx.Module | None, k: int, kv_dtype, placement):
        self.method = method
        self.k = k
        self.graphdef = runner.graphdef
        self.block_size = runner.block_size
        self.max_model_len = runner.max_model_len
        self.num_slots = runner.num_slots
        if head is None:
            target = nnx.merge(runner.graphdef, runner.params)
            if not hasattr(target, "mtp"):
                raise ValueError("speculative_config.method 'mtp' needs a model with multi-token-prediction "
                                 "layers (num_nextn_predict_layers > 0 and their weights)")
            head_spec, self.capture = target.mtp[0].kv_layer, None
            self.head_graphdef, self.head_params = None, None
        else:
            head_spec, self.capture = head.kv_layer, tuple(head.aux_layers)
            self.head_graphdef, self.head_params = nnx.split(head)
            if runner.mesh is not None:
                self.head_params = shard_state(self.head_params, runner.mesh)
        blocks = runner.dp * runner.group_blocks[0]
        self.kv_cache = allocate(head_spec, blocks, runner.block_size, kv_dtype, placement)
        if jnp.dtype(kv_dtype).itemsize == 1:  # FP8: unit scales (the head's values are of the target's scale)
            self.kv_cache = KVCache(self.kv_cache.arrays,
                                    tuple(jax.device_put(jnp.float32(1), runner.device) for _ in head_spec.arrays))
        # On a mesh the cache keeps its sharding through the step (one executable, as the runner's).
        shardings = {} if runner.mesh is None else {
            "out_shardings": (runner.device, jax.tree.map(lambda a: a.sharding, self.kv_cache))}
        self._fn = jax.jit(self._propose, donate_argnums=(2,), static_argnames=("num_tokens",), **shardings)

    def propose(self, params, features, history, block_tables, inputs, num_accepted, num_tokens: int) -> jax.Array:
        """Steps 1-3 for one step's rows -> drafts [R, k] (argmax ids of the target's vocabulary)."""
        drafts, self.kv_cache = self._fn(params, self.head_params, self.kv_cache, features, history, block_tables,
                                         inputs, num_accepted, num_tokens=num_tokens)
        return drafts

    def _head(self, model, head_params):
        return model.mtp[0] if self.head_graphdef is None else nnx.merge(self.head_graphdef, head_params)

    def _propose(self, params, head_params, kv_cache, features, history, block_tables, inputs, num_accepted, *,
                 num_tokens: int):
        model = nnx.merge(self.graphdef, params)
        head = self._head(model, head_params)
        bs = self.block_size
        row, offset, valid, last, q_lens = token_rows(inputs.query_start_loc, inputs.num_seqs, num_tokens)
        cu, num_seqs = inputs.query_start_loc[0], inputs.num_seqs[0]
        positions = jnp.where(valid, inputs.num_computed[row] + offset, 0)
        slots = inputs.slots[row]
        next_ids = jnp.where(valid, history[slots, positions + 1], 0)
        tables = block_tables[inputs.slots]  # group 0's rows come first
        slot_mapping = jnp.where(valid, tables[row, positions // bs] * bs + positions % bs, 0)
        meta = AttentionMetadata(slot_mapping=slot_mapping, query_start_loc=cu, seq_lens=inputs.num_computed + q_lens,
                                 block_tables=tables, num_seqs=num_seqs, token_mask=valid)
        hidden, kv_cache = head(model, head.project(model, features), next_ids, positions, kv_cache, meta)

        num_rows = last.shape[0]
        index = jnp.maximum(last - inputs.num_drafts + num_accepted - 1, 0)  # each row's last verified position
        h, token, pos = hidden[index], head.draft_tokens(model, hidden[index]), positions[index] + 1
        live = inputs.do_sample & (jnp.arange(num_rows) < num_seqs)
        if self.k == 1:
            return token[:, None], kv_cache
        # The draft steps attend over the rows' blocks copied out (`_rows_cache`), and write
        # there: their keys are needed only within this call (the next catch-up pass rewrites
        # those positions before anything reads them), and a cache that is read and then written
        # again within one program is copied whole by XLA:CPU at every step (~50 ms a step for
        # SmolLM2's head at the default CPU budget, against ~3 ms here).
        step_cache, step_tables = _rows_cache(kv_cache, tables)
        decode_cu = jnp.arange(num_rows + 1, dtype=jnp.int32)
        width = tables.shape[1]

        def draft_step(carry):
            h, token, pos, step_cache = carry
            ok = live & (pos < self.max_model_len)
            at = jnp.minimum(pos, self.max_model_len - 1)
            block = step_tables[jnp.arange(num_rows), jnp.minimum(at // bs, width - 1)]
            step_meta = AttentionMetadata(
                slot_mapping=jnp.where(ok, block * bs + at % bs, 0), query_start_loc=decode_cu, seq_lens=at + 1,
                block_tables=step_tables, num_seqs=num_seqs, token_mask=ok)
            h, step_cache = head(model, h, token, at, step_cache, step_meta)
            token = head.draft_tokens(model, h)
            return (h, token, pos + 1, step_cache), token

        drafts, carry = [token], (h, token, pos, step_cache)
        for _ in range(self.k - 1):  # unrolled: k <= 16
            carry, token = draft_step(carry)
            drafts.append(token)
        return jnp.stack(drafts, axis=1), kv_cache


def _rows_cache(kv_cache: KVCache, tables: jax.Array) -> tuple[KVCache, jax.Array]:
    """The blocks of each row's table copied into a cache of their own (`[1 + R * W, ...]`, block 0
    the null block), and the tables into it (row r's block i at 1 + r * W + i)."""
    num_rows, width = tables.shape
    arrays = tuple(jnp.concatenate([jnp.zeros_like(a[:1]), a[tables.reshape(-1)]]) for a in kv_cache.arrays)
    own = 1 + jnp.arange(num_rows * width, dtype=jnp.int32).reshape(num_rows, width)
    return KVCache(arrays, kv_cache.scales), own


class DraftHeadProposer(Proposer):
    """The host side of "eagle3" and "mtp": the drafts each row's step computed (`DraftHead`),
    which the engine hands over with the step's results."""

    needs_hidden_states = True

    def propose(self, token_ids: Sequence[int], max_drafts: int, hidden_states=None) -> Proposal:
        """`hidden_states`: this row's drafts from its step, [k] ids."""
        if hidden_states is None:
            return Proposal([])
        return Proposal(np.asarray(hidden_states)[: min(max_drafts, self.num_speculative_tokens)].tolist())
