"""On-device batched sampling with vLLM's semantics.

`sample(logits, tensors, step_key)` turns the last-position logits `[R, V]` of one step into one
token per row. The order of operations follows vLLM's V1 sampler:

1. raw logprobs: `log_softmax` of the logits as the model produced them (vLLM's default
   `logprobs_mode="raw_logprobs"`), so penalties, bias and temperature never change a reported
   logprob;
2. logit bias, then the `min_tokens` ban on stop/EOS ids, then repetition / frequency / presence
   penalties;
3. greedy rows (temperature 0) take the argmax of those logits;
4. other rows: divide by temperature, mask by min-p, then top-k, then top-p, then draw by
   Gumbel-max (`argmax(logits + Gumbel noise)`, an exact sample of `softmax(logits)`).

Randomness. A row with a seed draws its noise from `fold_in(key(seed), output_position)`, so its
tokens depend only on its seed, its logits and how many tokens it has generated: not on the row
index, the batch size or its companions. A row without a seed uses `fold_in(step_key, row)`; the
caller passes a fresh threefry `step_key` each step (`make_step_key(engine_seed, step)`). Keys
are threefry2x32 built from all 64 bits of the seed; for 0 <= seed < 2**32, `key(seed)` equals
`jax.random.key(seed, impl="threefry2x32")`.

Static variants. The costly or bulky parts are chosen at trace time, so each jitted variant does
only what its batch needs and the engine compiles a handful of them:
- the `[R, V]` penalty arrays, the logit bias and the stop-token ban are optional fields of
  `SamplingTensors`: `None` skips that stage (the pytree structure is part of the jit key);
- `use_top_k_top_p` (a static field) enables the full-vocabulary sort that top-k and top-p need;
  rows with top-k and top-p off are unchanged by it, bit for bit;
- `all_greedy` (static) skips the noise and filtering altogether;
- `num_logprobs` (static): `None` computes no logprobs, `k >= 0` the sampled token's logprob and
  rank plus the top-k. Rows that asked for fewer take a prefix on the host.
A static flag only ever turns on work whose result is a no-op for rows that do not need it, so a
seeded row samples the same token in every variant.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.sampling_params import SamplingParams

_PRNG_IMPL = "threefry2x32"


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingTensors:
    """Per-row sampling parameters of one step, as device (or numpy) arrays; R rows, V vocab.

    Neutral values (a padding row uses them all): temperature 0 (greedy), top_k 0, top_p 1,
    min_p 0, penalties 0 / 0 / 1, has_seed False, bias and stop ids -1.

    - `temperature [R] f32`: 0 means greedy.
    - `top_k [R] i32`: 0 or >= V means off.  `top_p [R] f32`: 1 means off.  `min_p [R] f32`.
    - `presence_penalty`, `frequency_penalty`, `repetition_penalty [R] f32`.
    - `seed [R, 2] u32`: the threefry key data of the row's seed, `[seed >> 32, seed & 0xffffffff]`.
    - `has_seed [R] bool`; `output_position [R] i32`: number of tokens the row has already
      generated (0 for the first sampled token), the counter folded into a seeded key.
    - `prompt_mask [R, V] bool` / `output_counts [R, V] i32` (optional, together): which tokens
      occur in the prompt, and how often each occurs in the output so far. The engine keeps them
      per request slot on device: `token_counts(prompt) > 0` once at admission, then
      `count_sampled_tokens` after each step; a step gathers its rows. `None` skips penalties.
    - `logit_bias_ids [R, K] i32` / `logit_bias_values [R, K] f32` (optional, together): sparse
      bias added to the logits; pad ids with -1.
    - `stop_token_ids [R, S] i32` / `ban_stop_tokens [R] bool` (optional, together): the row's
      EOS and stop ids (pad -1) and whether they are banned this step (output length <
      min_tokens).
    """

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    presence_penalty: jax.Array
    frequency_penalty: jax.Array
    repetition_penalty: jax.Array
    seed: jax.Array
    has_seed: jax.Array
    output_position: jax.Array
    prompt_mask: jax.Array | None = None
    output_counts: jax.Array | None = None
    logit_bias_ids: jax.Array | None = None
    logit_bias_values: jax.Array | None = None
    stop_token_ids: jax.Array | None = None
    ban_stop_tokens: jax.Array | None = None
    use_top_k_top_p: bool = dataclasses.field(default=True, metadata=dict(static=True))
    all_greedy: bool = dataclasses.field(default=False, metadata=dict(static=True))
    num_logprobs: int | None = dataclasses.field(default=None, metadata=dict(static=True))

    @classmethod
    def from_params(
        cls,
        params: Sequence[SamplingParams],
        *,
        vocab_size: int,
        num_rows: int | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        output_token_ids: Sequence[Sequence[int]] | None = None,
        eos_token_ids: Sequence[int] = (),
        num_logprobs: int | None = None,
    ) -> SamplingTensors:
        """Build the tensors on the host (numpy) for `params`, padded to `num_rows` rows.

        `output_token_ids[i]` (default: none yet) gives row i's output position, its output
        counts and whether its stop ids are still banned; `prompt_token_ids[i]` its prompt mask.
        Optional stages are included only when some row needs them; the sparse widths K and S are
        padded to powers of two. `num_logprobs` defaults to the largest `logprobs` asked for.
        """
        num_rows = len(params) if num_rows is None else num_rows
        assert num_rows >= len(params), f"num_rows {num_rows} < {len(params)} requests"
        outputs = list(output_token_ids or [()] * len(params))
        prompts = list(prompt_token_ids or [()] * len(params))
        pad = num_rows - len(params)
        greedy = [p.greedy for p in params]

        def column(values, neutral, dtype):
            return np.array(list(values) + [neutral] * pad, dtype=dtype)

        seeds = [0 if p.seed is None else p.seed % 2**64 for p in params]
        tensors = cls(
            temperature=column((0.0 if g else p.temperature for p, g in zip(params, greedy)), 0.0,
                               np.float32),
            top_k=column((p.top_k for p in params), 0, np.int32),
            top_p=column((p.top_p for p in params), 1.0, np.float32),
            min_p=column((p.min_p for p in params), 0.0, np.float32),
            presence_penalty=column((p.presence_penalty for p in params), 0.0, np.float32),
            frequency_penalty=column((p.frequency_penalty for p in params), 0.0, np.float32),
            repetition_penalty=column((p.repetition_penalty for p in params), 1.0, np.float32),
            seed=np.array([[s >> 32, s & 0xFFFFFFFF] for s in seeds] + [[0, 0]] * pad,
                          dtype=np.uint32).reshape(num_rows, 2),
            has_seed=column((p.seed is not None for p in params), False, bool),
            output_position=column((len(o) for o in outputs), 0, np.int32),
            use_top_k_top_p=any(
                not g and (0 < p.top_k < vocab_size or p.top_p < 1.0)
                for p, g in zip(params, greedy)
            ),
            all_greedy=all(greedy),
            num_logprobs=num_logprobs if num_logprobs is not None else max(
                (p.logprobs for p in params if p.logprobs is not None), default=None),
        )
        if any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0
               for p in params):
            tensors.prompt_mask = np.zeros((num_rows, vocab_size), bool)
            tensors.output_counts = np.zeros((num_rows, vocab_size), np.int32)
            for row, (prompt, output) in enumerate(zip(prompts, outputs)):
                tensors.prompt_mask[row, np.asarray(prompt, np.int64)] = True
                np.add.at(tensors.output_counts[row], np.asarray(output, np.int64), 1)
        if any(p.logit_bias for p in params):
            biases = [p.logit_bias or {} for p in params]
            tensors.logit_bias_ids = _pad_ragged([list(b) for b in biases], num_rows, -1, np.int32)
            tensors.logit_bias_values = _pad_ragged(
                [list(b.values()) for b in biases], num_rows, 0.0, np.float32)
        if any(p.min_tokens for p in params):
            stops = [p.stop_token_ids + ([] if p.ignore_eos else list(eos_token_ids))
                     for p in params]
            tensors.stop_token_ids = _pad_ragged(stops, num_rows, -1, np.int32)
            tensors.ban_stop_tokens = column(
                (len(o) < p.min_tokens for p, o in zip(params, outputs)), False, bool)
        return tensors


def _pad_ragged(rows: list[list], num_rows: int, fill, dtype) -> np.ndarray:
    """Stack ragged rows into `[num_rows, width]`, width a power of two (few compiled shapes)."""
    width = 1 << max(0, max(map(len, rows)) - 1).bit_length()
    array = np.full((num_rows, width), fill, dtype)
    for row, values in enumerate(rows):
        array[row, : len(values)] = values
    return array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplerOutput:
    """Sampled tokens `[R] i32` and, when asked, logprobs from the raw logits.

    `sampled_logprob [R] f32` and `sampled_rank [R] i32` (1-based: 1 + the number of tokens with
    a strictly larger logprob) describe the sampled token; `top_ids [R, k] i32` and
    `top_logprobs [R, k] f32` the k most likely tokens, most likely first.
    """

    token_ids: jax.Array
    sampled_logprob: jax.Array | None = None
    sampled_rank: jax.Array | None = None
    top_ids: jax.Array | None = None
    top_logprobs: jax.Array | None = None


def sample(logits: jax.Array, tensors: SamplingTensors, step_key: jax.Array) -> SamplerOutput:
    """Sample one token per row of `logits [R, V]`; jit it, the static choices ride in `tensors`."""
    logits = logits.astype(jnp.float32)
    raw_logits = logits
    if tensors.logit_bias_ids is not None:
        logits = apply_logit_bias(logits, tensors.logit_bias_ids, tensors.logit_bias_values)
    if tensors.stop_token_ids is not None:
        logits = ban_tokens(logits, tensors.stop_token_ids, tensors.ban_stop_tokens)
    if tensors.prompt_mask is not None:
        logits = apply_penalties(
            logits, tensors.prompt_mask, tensors.output_counts, tensors.presence_penalty,
            tensors.frequency_penalty, tensors.repetition_penalty)
    token_ids = argmax(logits)
    if not tensors.all_greedy:
        random_ids = _sample_random(logits, tensors, step_key)
        token_ids = jnp.where(tensors.temperature == 0.0, token_ids, random_ids)
    output = SamplerOutput(token_ids=token_ids)
    if tensors.num_logprobs is not None:
        output = compute_logprobs(raw_logits, token_ids, tensors.num_logprobs)
    return output


def compute_logprobs(logits: jax.Array, token_ids: jax.Array, num_logprobs: int) -> SamplerOutput:
    """Logprob and rank of `token_ids [N]` and the top `num_logprobs` under `log_softmax(logits)`.

    Serves sampled tokens and prompt logprobs alike (for the prompt, pass the logits of positions
    0..P-2 and the prompt tokens 1..P-1).
    """
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    sampled = jnp.take_along_axis(logprobs, token_ids[:, None], axis=-1)[:, 0]
    rank = 1 + jnp.sum(logprobs > sampled[:, None], axis=-1, dtype=jnp.int32)
    top_logprobs, top_ids = jax.lax.top_k(logprobs, num_logprobs)
    return SamplerOutput(token_ids.astype(jnp.int32), sampled, rank, top_ids.astype(jnp.int32),
                         top_logprobs)


def apply_logit_bias(logits: jax.Array, bias_ids: jax.Array, bias_values: jax.Array) -> jax.Array:
    """Add `bias_values [R, K]` at token ids `bias_ids [R, K]`; ids of -1 are padding."""
    rows = jnp.arange(logits.shape[0])[:, None]
    return logits.at[rows, _drop_padding(bias_ids, logits.shape[1])].add(bias_values, mode="drop")


def ban_tokens(logits: jax.Array, token_ids: jax.Array, ban: jax.Array) -> jax.Array:
    """Set `token_ids [R, S]` (pad -1) to -inf in the rows where `ban [R]` holds."""
    vocab_size = logits.shape[1]
    ids = jnp.where(ban[:, None], _drop_padding(token_ids, vocab_size), vocab_size)
    rows = jnp.arange(logits.shape[0])[:, None]
    return logits.at[rows, ids].set(-jnp.inf, mode="drop")


def apply_penalties(
    logits: jax.Array,
    prompt_mask: jax.Array,
    output_counts: jax.Array,
    presence_penalty: jax.Array,
    frequency_penalty: jax.Array,
    repetition_penalty: jax.Array,
) -> jax.Array:
    """vLLM's penalties: repetition on tokens seen in prompt or output, the others on the output.

    The repetition penalty divides positive logits and multiplies the others; frequency subtracts
    `penalty * count`, presence subtracts `penalty` once per token seen in the output.
    """
    output_mask = output_counts > 0
    repetition = jnp.where(prompt_mask | output_mask, repetition_penalty[:, None], 1.0)
    logits = jnp.where(logits > 0, logits / repetition, logits * repetition)
    logits = logits - frequency_penalty[:, None] * output_counts.astype(jnp.float32)
    return logits - presence_penalty[:, None] * output_mask.astype(jnp.float32)


def token_counts(token_ids: jax.Array, lengths: jax.Array, vocab_size: int) -> jax.Array:
    """Occurrences `[R, V] i32` of each token among the first `lengths[r]` of `token_ids [R, L]`.

    A scatter-add on device; use it when a request enters a slot (prompt mask, or output counts
    after a preemption), not every step.
    """
    valid = jnp.arange(token_ids.shape[1])[None, :] < lengths[:, None]
    ids = jnp.where(valid, token_ids, vocab_size)
    rows = jnp.arange(token_ids.shape[0])[:, None]
    counts = jnp.zeros((token_ids.shape[0], vocab_size), jnp.int32)
    return counts.at[rows, ids].add(1, mode="drop")


def count_sampled_tokens(
    output_counts: jax.Array, slots: jax.Array, token_ids: jax.Array
) -> jax.Array:
    """Add this step's `token_ids [R]` to per-slot `output_counts [S, V]`; slot -1 is padding."""
    slots = jnp.where(slots < 0, output_counts.shape[0], slots)
    return output_counts.at[slots, token_ids].add(1, mode="drop")


def _drop_padding(token_ids: jax.Array, vocab_size: int) -> jax.Array:
    """Map -1 padding to an out-of-range id that `mode="drop"` scatters skip (JAX would wrap -1)."""
    return jnp.where(token_ids < 0, vocab_size, token_ids)


def _sample_random(logits: jax.Array, tensors: SamplingTensors, step_key: jax.Array) -> jax.Array:
    temperature = jnp.where(tensors.temperature == 0.0, 1.0, tensors.temperature)
    logits = logits / temperature[:, None]
    logits = apply_min_p(logits, tensors.min_p)
    if tensors.use_top_k_top_p:
        logits = apply_top_k_top_p(logits, tensors.top_k, tensors.top_p)
    keys = _row_keys(tensors, step_key)
    noise = jax.vmap(lambda key: jax.random.gumbel(key, logits.shape[1:], jnp.float32))(keys)
    return argmax(logits + noise)


def argmax(logits: jax.Array) -> jax.Array:
    """`jnp.argmax` over the last axis (first maximum; NaN counts as the maximum), as a max and a
    min reduction: XLA:CPU runs argmax's paired value-index reduction ~10x slower (7.3 against
    0.6 ms for [32, 49152] on a 2-core CPU)."""
    top = logits.max(axis=-1, keepdims=True)
    hit = (logits == top) | jnp.isnan(logits)
    index = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(hit, index, logits.shape[-1]), axis=-1)


def apply_min_p(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    """Mask tokens whose probability is below `min_p` times the row's largest (vLLM's min-p).

    In logit space, `p < min_p * p_max` is `logit < max_logit + log(min_p)`: no softmax needed;
    `min_p = 0` gives `log 0 = -inf` and masks nothing.
    """
    threshold = jnp.max(logits, axis=-1) + jnp.log(min_p)
    return jnp.where(logits < threshold[:, None], -jnp.inf, logits)


def apply_top_k_top_p(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """vLLM's top-k then top-p, on one ascending sort of each row.

    Top-k keeps the tokens at least as large as the k-th largest; top-p then drops the smallest
    tokens while their cumulative probability (after top-k) stays <= 1 - p, keeping at least one.
    Both masks are prefixes of the ascending order, so the result is a threshold: every token at
    or above the smallest kept value survives (ties at the edge are all kept; vLLM keeps an
    arbitrary subset). Rows with top-k and top-p off come back unchanged.
    """
    vocab_size = logits.shape[1]
    ascending = jnp.sort(logits, axis=-1)
    k_active = (top_k > 0) & (top_k < vocab_size)
    kth_largest = jnp.take_along_axis(
        ascending, jnp.clip(vocab_size - top_k, 0, vocab_size - 1)[:, None], axis=-1)
    k_masked = k_active[:, None] & (ascending < kth_largest)
    probs = jax.nn.softmax(jnp.where(k_masked, -jnp.inf, ascending), axis=-1)
    p_masked = jnp.cumsum(probs, axis=-1) <= (1.0 - top_p)[:, None]
    p_masked = p_masked.at[:, -1].set(False) & (top_p < 1.0)[:, None]
    num_masked = jnp.sum(k_masked | p_masked, axis=-1)
    threshold = jnp.take_along_axis(ascending, num_masked[:, None], axis=-1)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def _row_keys(tensors: SamplingTensors, step_key: jax.Array) -> jax.Array:
    """One typed key per row: from (seed, output position) if seeded, else (step key, row)."""
    num_rows = tensors.temperature.shape[0]
    seeded = jax.vmap(jax.random.fold_in)(
        jax.random.wrap_key_data(jnp.asarray(tensors.seed, jnp.uint32), impl=_PRNG_IMPL),
        tensors.output_position)
    unseeded = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(step_key, jnp.arange(num_rows))
    data = jnp.where(tensors.has_seed[:, None], jax.random.key_data(seeded),
                     jax.random.key_data(unseeded))
    return jax.random.wrap_key_data(data, impl=_PRNG_IMPL)


def make_step_key(seed: int, step: int) -> jax.Array:
    """The key `sample` needs for engine step `step`, from the engine-wide `seed` (threefry)."""
    return jax.random.fold_in(jax.random.key(seed, impl=_PRNG_IMPL), step)
