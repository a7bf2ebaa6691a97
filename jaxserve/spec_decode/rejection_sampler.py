"""The verifier: rejection sampling of k drafts per row against the target's logits, on device.

Each row scores its last known token and its `num_drafts` drafts in one target step, which gives
`logits [R, k + 1, V]`, entry i the target's distribution of the token after the row's i-th
scored position (left-aligned: entries past `num_drafts` are padding). Draft i is accepted with
probability min(1, p_i(d_i) / q_i(d_i)) (Leviathan et al. 2023; Chen et al. 2023), where p_i is
the target's distribution after the request's sampling transforms (logit bias, penalties,
temperature, min-p, top-k, top-p) and q_i the proposer's (one-hot for a deterministic proposer: `draft_probs` None).
At the first rejected position the token is drawn from the normalized residual max(0, p_i − q_i);
when every draft is accepted, a bonus token is drawn from the entry after the last draft by the
ordinary sampler (jaxserve/sampler.py `sample`). So each row yields 1 to k + 1 tokens whose
distribution is exactly the target's. A greedy row (temperature 0) accepts while its draft equals
the target's argmax and then takes the argmax: the tokens plain greedy decoding gives.

Randomness. The bonus draw is the ordinary sampler's, at the output position it fills (a seeded
row folds that position into its key; an unseeded row folds its row into the step key). The
acceptance uniforms and residual draws of draft position i come from that same per-position key
folded with i and a tag, so they are independent of each other and of the bonus draw, and a
seeded row's tokens depend only on its seed, logits and drafts. A row without drafts draws
exactly what the ordinary sampler draws.

Penalties count a row's drafts before each position as output, as plain decoding would have
counted them once accepted. Rows that need what the verifier does not apply at draft positions
(structured-output masks, min_tokens bans) must not carry drafts: the engine gives them none
(jaxserve/spec_decode/speculator.py), and their single token comes from the ordinary sampler.

In the engine (`verify_and_record`) the logits are packed, each row's last known token and its
drafts (`scored_positions`), and the drafts are read from the token history.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxserve.sampler import (SamplingTensors, _row_keys, _uses_penalties, apply_if, apply_logit_bias, apply_min_p,
                              apply_penalties, apply_top_k_top_p, argmax, compute_if, compute_logprobs,
                              count_sampled_tokens, sample)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class VerifierOutput:
    """`token_ids [R, k + 1]`: each row's accepted drafts, then its recovered or bonus token, then
    -1; `num_tokens [R]` (1 + accepted drafts). The logprob fields, when asked for, describe each
    of those tokens under the raw logits of its position (`[R, k + 1]`, `[R, k + 1, n]`), as the
    ordinary sampler's describe its one token."""

    token_ids: jax.Array
    num_tokens: jax.Array
    sampled_logprob: jax.Array | None = None
    sampled_rank: jax.Array | None = None
    top_ids: jax.Array | None = None
    top_logprobs: jax.Array | None = None


def rejection_sample(logits: jax.Array, draft_ids: jax.Array, num_drafts: jax.Array, tensors: SamplingTensors,
                     step_key: jax.Array, draft_probs: jax.Array | None = None, *,
                     argmax_only: bool = False) -> VerifierOutput:
    """Verify `draft_ids [R, k]` (the first `num_drafts [R]` of each row are real) against
    `logits [R, k + 1, V]` (see the module docstring). `draft_probs [R, k, V]`: the proposer's q,
    None for one-hot drafts. `argmax_only` (static): every row greedy with nothing to apply
    (`sampler.needs_only_argmax`)."""
    if argmax_only:
        return greedy_verify(argmax(logits), draft_ids, num_drafts)
    num_rows, k = draft_ids.shape
    rows = jnp.arange(num_rows)
    live = jnp.arange(k)[None, :] < num_drafts[:, None]
    bonus_tensors = dataclasses.replace(tensors, output_position=tensors.output_position + num_drafts)
    if tensors.prompt_mask is not None:  # penalties: each row's statistics, the bonus's counting its drafts
        tensors = _with_row_tables(tensors)
        bonus_tensors = dataclasses.replace(
            tensors, output_position=bonus_tensors.output_position,
            output_counts=tensors.output_counts.at[rows[:, None], draft_ids].add(live.astype(jnp.int32), mode="drop"))
    bonus = sample(logits[rows, num_drafts], bonus_tensors, step_key)
    accept, recovered = _verify(logits[:, :k], draft_ids, live, draft_probs, tensors, step_key)
    token_ids, num_tokens = _assemble(draft_ids, num_drafts, accept, recovered, bonus.token_ids)
    return VerifierOutput(token_ids, num_tokens, bonus.sampled_logprob, bonus.sampled_rank, bonus.top_ids,
                          bonus.top_logprobs)


def greedy_verify(target_ids: jax.Array, draft_ids: jax.Array, num_drafts: jax.Array) -> VerifierOutput:
    """`rejection_sample` for rows that take the argmax, given it: `target_ids [R, k + 1]`."""
    k = draft_ids.shape[1]
    bonus = target_ids[jnp.arange(target_ids.shape[0]), num_drafts]
    token_ids, num_tokens = _assemble(draft_ids, num_drafts, draft_ids == target_ids[:, :k], target_ids[:, :k], bonus)
    return VerifierOutput(token_ids, num_tokens)


def _assemble(draft_ids, num_drafts, accept, recovered, bonus_ids):
    """(token_ids [R, k + 1], num_tokens [R]): the accepted prefix of drafts, then the token at the
    first rejection (`recovered`) or, all accepted, the bonus token; -1 after."""
    num_rows, k = draft_ids.shape
    accept &= jnp.arange(k)[None, :] < num_drafts[:, None]
    num_accepted = jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=1), axis=1)
    at_rejection = recovered[jnp.arange(num_rows), jnp.minimum(num_accepted, k - 1)]
    last = jnp.where(num_accepted < num_drafts, at_rejection, bonus_ids)
    column = jnp.arange(k + 1)[None, :]
    drafts = jnp.concatenate([draft_ids, jnp.zeros((num_rows, 1), draft_ids.dtype)], axis=1)
    token_ids = jnp.where(column < num_accepted[:, None], drafts,
                          jnp.where(column == num_accepted[:, None], last[:, None], -1)).astype(jnp.int32)
    return token_ids, num_accepted + 1


def target_logits(logits: jax.Array, tensors: SamplingTensors, draft_ids: jax.Array,
                  live: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(adjusted logits, transformed logits) of `logits [R, k, V]`: logit bias and penalties (the
    greedy view; position i counts the row's drafts before it as output), then temperature,
    min-p, top-k and top-p (softmax of them is p). Greedy rows divide by 1. Penalties need the
    row tables of `_with_row_tables` (`tensors.prompt_mask` None: none)."""
    num_rows, k, vocab_size = logits.shape

    def per_position(x):
        return jnp.repeat(x, k, axis=0)

    def penalize(flat):
        drafted = (draft_ids[..., None] == jnp.arange(vocab_size)) & live[..., None]
        before = jnp.cumsum(drafted, axis=1, dtype=jnp.int32) - drafted  # drafts before each position
        counts = (tensors.output_counts[:, None, :] + before).reshape(num_rows * k, vocab_size)
        return apply_penalties(flat, per_position(tensors.prompt_mask), counts, per_position(tensors.presence_penalty),
                               per_position(tensors.frequency_penalty), per_position(tensors.repetition_penalty))

    flat = logits.reshape(num_rows * k, vocab_size).astype(jnp.float32)
    flat = apply_if(jnp.any(tensors.logit_bias_ids >= 0), apply_logit_bias, flat,
                    per_position(tensors.logit_bias_ids), per_position(tensors.logit_bias_values))
    if tensors.prompt_mask is not None:
        flat = apply_if(jnp.any(_uses_penalties(tensors)), penalize, flat)
    temperature = jnp.where(tensors.temperature == 0.0, 1.0, tensors.temperature)
    scaled = apply_min_p(flat / per_position(temperature)[:, None], per_position(tensors.min_p))
    filters = ((tensors.top_k > 0) & (tensors.top_k < vocab_size)) | (tensors.top_p < 1.0)
    scaled = apply_if(jnp.any(filters), apply_top_k_top_p, scaled, per_position(tensors.top_k),
                      per_position(tensors.top_p))
    shape = (num_rows, k, vocab_size)
    return flat.reshape(shape), scaled.reshape(shape)


def _verify(logits, draft_ids, live, draft_probs, tensors: SamplingTensors, step_key):
    """(accepted [R, k], token at each position if it is the first rejected one [R, k])."""
    num_rows, k, vocab_size = logits.shape
    biased, scaled = target_logits(logits, tensors, draft_ids, live)
    greedy = (tensors.temperature == 0.0)[:, None]
    greedy_ids = argmax(biased)
    p = jax.nn.softmax(scaled, axis=-1)
    p_draft = jnp.take_along_axis(p, draft_ids[..., None], axis=-1)[..., 0]
    is_draft = jnp.arange(vocab_size)[None, None, :] == draft_ids[..., None]
    if draft_probs is None:  # one-hot q: accept with probability p(d); residual p without d
        q_draft = jnp.ones_like(p_draft)
        residual = jnp.where(is_draft, 0.0, p)
    else:
        q_draft = jnp.take_along_axis(draft_probs, draft_ids[..., None], axis=-1)[..., 0]
        residual = jnp.maximum(p - draft_probs, 0.0)
    keys = _position_keys(tensors, step_key, k)
    uniform = jax.vmap(jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, 1))))(keys)
    noise = jax.vmap(jax.vmap(lambda key: jax.random.gumbel(jax.random.fold_in(key, 2), (vocab_size,))))(keys)
    recovered = argmax(jnp.log(residual) + noise)
    accept = jnp.where(greedy, draft_ids == greedy_ids, uniform * q_draft < p_draft)
    return accept, jnp.where(greedy, greedy_ids, recovered)


def _with_row_tables(tensors: SamplingTensors) -> SamplingTensors:
    """`tensors` with each row's penalty statistics gathered from the per-slot tables (`[R, V]`,
    `slot` None)."""
    rows = jnp.arange(tensors.temperature.shape[0]) if tensors.slot is None else tensors.slot
    return dataclasses.replace(tensors, prompt_mask=tensors.prompt_mask[rows], output_counts=tensors.output_counts[rows],
                               slot=None)


def _position_keys(tensors: SamplingTensors, step_key, k: int) -> jax.Array:
    """Keys `[R, k]`: draft position i's is the ordinary sampler's key for the output position it
    fills, folded with i."""

    def at(i):
        shifted = dataclasses.replace(tensors, output_position=tensors.output_position + i)
        keys = _row_keys(shifted, step_key)
        return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, i)

    return jax.vmap(at, out_axes=1)(jnp.arange(k, dtype=jnp.int32))


def verify_and_record(logits, sampling: SamplingTensors, step_key, history, penalty_state, inputs, *,
                      argmax_only: bool, num_speculative_tokens: int):
    """The model runner's sampler with speculation: `logits [P, V]`, each row's last known token
    and its `inputs.num_drafts` drafts packed row after row (`scored_positions`), drafts read
    from the token `history`. Verifies, then records the row's tokens in the history from the
    position after its last known token, and in the output counts.
    -> (VerifierOutput, history, penalty_state)."""
    k = num_speculative_tokens
    num_drafts = inputs.num_drafts
    width = 1 + num_drafts
    starts = jnp.cumsum(width) - width
    index = starts[:, None] + jnp.minimum(jnp.arange(k + 1)[None, :], num_drafts[:, None])  # [R, k + 1]
    q_lens = jnp.diff(inputs.query_start_loc, axis=-1).reshape(-1)
    first_draft = inputs.num_computed + q_lens - num_drafts  # = the first sampled token's position
    offsets = jnp.arange(k + 1, dtype=jnp.int32)[None, :]
    positions = jnp.minimum(first_draft[:, None] + offsets, history.shape[1] - 1)
    draft_ids = history[inputs.slots[:, None], positions[:, :k]]
    prompt_mask, output_counts = penalty_state
    tensors = dataclasses.replace(sampling, prompt_mask=prompt_mask, output_counts=output_counts, slot=inputs.slots)
    if argmax_only:  # the argmax of the packed rows, then gathered: no [R, k + 1, V] copy
        out = greedy_verify(argmax(logits)[index], draft_ids, num_drafts)
    else:
        scored = logits[index]
        out = rejection_sample(scored, draft_ids, num_drafts, tensors, step_key)
        if tensors.num_logprobs is not None:
            out = _with_logprobs(out, scored, tensors)
    written = inputs.do_sample[:, None] & (offsets < out.num_tokens[:, None])
    write_row = jnp.where(written, inputs.slots[:, None], history.shape[0])
    history = history.at[write_row, first_draft[:, None] + offsets].set(out.token_ids, mode="drop")
    output_counts = count_sampled_tokens(output_counts, write_row.reshape(-1), jnp.maximum(out.token_ids, 0).reshape(-1))
    return out, history, (prompt_mask, output_counts)


def scored_positions(last: jax.Array, num_drafts: jax.Array, size: int) -> jax.Array:
    """Token indices `[size]` whose logits the verifier needs, packed: each row's last known
    token and its drafts (its last 1 + n tokens, ending at `last`), row after row; 0 past them.
    `size` >= the real rows plus their drafts (real rows come before padding rows)."""
    width = 1 + num_drafts
    ends = jnp.cumsum(width)
    slot = jnp.arange(size, dtype=jnp.int32)
    row = jnp.minimum(jnp.sum(ends[None, :] <= slot[:, None], axis=1), last.shape[0] - 1)
    position = last[row] - num_drafts[row] + slot - (ends[row] - width[row])
    return jnp.where(slot < ends[-1], position, 0)


def _with_logprobs(out: VerifierOutput, scored: jax.Array, tensors: SamplingTensors) -> VerifierOutput:
    """`out` with the logprobs of every position's token under its raw logits `scored [R, k + 1, V]`
    (zeros unless a row asked: `compute_if`)."""
    num_rows, width, vocab_size = scored.shape

    def per_position(scored, token_ids):
        lp = compute_logprobs(scored.reshape(num_rows * width, vocab_size), token_ids.reshape(-1),
                              tensors.num_logprobs)
        return (lp.sampled_logprob.reshape(num_rows, width), lp.sampled_rank.reshape(num_rows, width),
                lp.top_ids.reshape(num_rows, width, -1), lp.top_logprobs.reshape(num_rows, width, -1))

    fields = compute_if(jnp.any(tensors.wants_logprobs), per_position, scored, jnp.maximum(out.token_ids, 0))
    return dataclasses.replace(out, sampled_logprob=fields[0], sampled_rank=fields[1], top_ids=fields[2],
                               top_logprobs=fields[3])
