"""On-device batched sampling with vLLM's semantics.

`sample(logits, tensors, step_key)` turns the last-position logits `[R, V]` of one step into one
token per row. The order of operations follows vLLM's V1 sampler:

1. raw logprobs: `log_softmax` of the logits as the model produced them (vLLM's default
   `logprobs_mode="raw_logprobs"`), so penalties, bias and temperature never change a reported
   logprob;
2. the structured-output mask (a row's disallowed tokens to -inf), then logit bias (the
   `min_tokens` ban on stop/EOS ids rides in it as -inf entries), then repetition / frequency /
   presence penalties (none of which lifts a -inf);
3. greedy rows (temperature 0) take the argmax of those logits;
4. other rows: divide by temperature, mask by min-p, then top-k, then top-p, then draw by
   Gumbel-max (`argmax(logits + Gumbel noise)`, an exact sample of `softmax(logits)`).

Randomness. A row with a seed draws its noise from `fold_in(key(seed), output_position)`, so its
tokens depend only on its seed, its logits and how many tokens it has generated: not on the row
index, the batch size or its companions. A row without a seed uses `fold_in(step_key, row)`; the
caller passes a fresh threefry `step_key` each step (`make_step_key(engine_seed, step)`). Keys
are threefry2x32 built from all 64 bits of the seed; for 0 <= seed < 2**32, `key(seed)` equals
`jax.random.key(seed, impl="threefry2x32")`.

One program for every batch. Which stages a batch needs (sampling, the full-vocabulary sort of
top-k / top-p, the structured-output token mask, bias, penalties, logprobs) is decided at run
time, by a `lax.cond` on a flag read from the tensors, never at trace time: an engine compiles
one sampler per rows bucket at start-up, and no mix of `SamplingParams` compiles anything after
that (a compile stalled every stream for seconds). XLA runs only the branch taken, so a stage no
row needs costs the flag. The shapes are the caller's: `num_logprobs` (static) is the width of
the top logprobs whichever `logprobs` the rows ask for (rows that asked for fewer take a prefix on
the host), the logit bias table is as wide as the engine allows, and the token mask always covers
the vocabulary (-1, every token allowed, in rows without a constraint). A stage leaves the rows
that do not use it unchanged, bit for bit, so a seeded row samples the same token whatever its
companions switch on.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

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
    min_p 0, penalties 0 / 0 / 1, has_seed False, wants_logprobs False, bias ids -1.

    - `temperature [R] f32`: 0 means greedy.
    - `top_k [R] i32`: 0 or >= V means off.  `top_p [R] f32`: 1 means off.  `min_p [R] f32`.
    - `presence_penalty`, `frequency_penalty`, `repetition_penalty [R] f32`.
    - `seed [R, 2] u32`: the threefry key data of the row's seed, `[seed >> 32, seed & 0xffffffff]`.
    - `has_seed [R] bool`; `output_position [R] i32`: number of tokens the row has already
      generated (0 for the first sampled token), the counter folded into a seeded key.
    - `wants_logprobs [R] bool`: the row reports logprobs.
    - `logit_bias_ids [R, K] i32` / `logit_bias_values [R, K] f32`: sparse bias added to the
      logits, ids padded with -1. While a row's output is shorter than its `min_tokens`, its stop
      and EOS ids join them with -inf: banned.
    - `token_bitmask [R, ceil(V / 32)] i32`: the tokens a row may sample (structured outputs), bit
      `t % 32` of word `t // 32` for token t (llguidance's layout); -1 (every bit set) allows all.
    - `prompt_mask [N, V] bool` / `output_counts [N, V] i32` (optional, together): which tokens
      occur in a request's prompt, and how often each occurs in its output so far; row r reads
      table row `slot[r]` (row r when `slot` is None). The model runner keeps these tables per
      request slot on device (`token_counts` of the prompt at admission, then each step's sampled
      tokens) and passes them whole. `None` skips penalties.
    - `num_logprobs` (static): how many top logprobs a row reports at most; None computes none.
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
    wants_logprobs: jax.Array
    logit_bias_ids: jax.Array
    logit_bias_values: jax.Array
    token_bitmask: jax.Array
    prompt_mask: jax.Array | None = None
    output_counts: jax.Array | None = None
    slot: jax.Array | None = None
    num_logprobs: int | None = dataclasses.field(default=None, metadata=dict(static=True))

    @classmethod
    def from_params(
        cls,
        params: Sequence[SamplingParams],
        *,
        vocab_size: int,
        num_rows: int | None = None,
        output_lengths: Sequence[int] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        output_token_ids: Sequence[Sequence[int]] | None = None,
        eos_token_ids: Sequence[int] = (),
        num_logprobs: int | None = None,
        bias_width: int | None = None,
    ) -> SamplingTensors:
        """Build the tensors on the host (numpy) for `params`, padded to `num_rows` rows.

        Row i has generated `output_lengths[i]` tokens (default: `len(output_token_ids[i])`, else
        none yet): its output position, and whether `min_tokens` still bans its stop ids. Given
        token ids, the penalty tables are built from them (an engine keeps its own on device
        instead; without tables penalties are skipped). An engine fixes `num_logprobs` and the
        bias table's `bias_width`, so that every step has one shape; left out, they are the
        largest `logprobs` asked for and the widest row's bias entries rounded up to a power of
        two.
        """
        num_rows = len(params) if num_rows is None else num_rows
        assert num_rows >= len(params), f"num_rows {num_rows} < {len(params)} requests"
        if output_lengths is None:
            output_lengths = [len(o) for o in output_token_ids] if output_token_ids else [0] * len(params)
        pad = num_rows - len(params)
        greedy = [p.greedy for p in params]

        def column(values, neutral, dtype):
            return np.array(list(values) + [neutral] * pad, dtype=dtype)

        seeds = [0 if p.seed is None else p.seed % 2**64 for p in params]
        bias_ids, bias_values = _bias_entries(params, output_lengths, eos_token_ids)
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
            output_position=column(output_lengths, 0, np.int32),
            wants_logprobs=column((p.logprobs is not None for p in params), False, bool),
            logit_bias_ids=_pad_ragged(bias_ids, num_rows, -1, np.int32, bias_width),
            logit_bias_values=_pad_ragged(bias_values, num_rows, 0.0, np.float32, bias_width),
            token_bitmask=allow_all_bitmask(num_rows, vocab_size),
            num_logprobs=num_logprobs if num_logprobs is not None else max(
                (p.logprobs for p in params if p.logprobs is not None), default=None),
        )
        if prompt_token_ids is not None or output_token_ids is not None:
            tensors.prompt_mask = np.zeros((num_rows, vocab_size), bool)
            tensors.output_counts = np.zeros((num_rows, vocab_size), np.int32)
            for row, (prompt, output) in enumerate(zip(prompt_token_ids or [()] * len(params),
                                                       output_token_ids or [()] * len(params))):
                tensors.prompt_mask[row, np.asarray(prompt, np.int64)] = True
                np.add.at(tensors.output_counts[row], np.asarray(output, np.int64), 1)
        return tensors


def allow_all_bitmask(num_rows: int, vocab_size: int) -> np.ndarray:
    """A `token_bitmask` that allows every token: `[num_rows, ceil(vocab_size / 32)]` of -1."""
    return np.full((num_rows, -(-vocab_size // 32)), -1, np.int32)


def _bias_entries(params: Sequence[SamplingParams], output_lengths: Sequence[int],
                  eos_token_ids: Sequence[int]) -> tuple[list[list[int]], list[list[float]]]:
    """Each row's bias (ids, values): its `logit_bias`, then its stop and EOS ids at -inf while its
    output is shorter than `min_tokens`. Adding -inf bans a token whatever its bias (finite)."""
    ids, values = [], []
    for p, length in zip(params, output_lengths):
        bias = p.logit_bias or {}
        banned = []
        if length < p.min_tokens:
            banned = p.stop_token_ids + ([] if p.ignore_eos else list(eos_token_ids))
        ids.append(list(bias) + banned)
        values.append(list(bias.values()) + [-np.inf] * len(banned))
    return ids, values


def _pad_ragged(rows: list[list], num_rows: int, fill, dtype, width: int | None = None) -> np.ndarray:
    """Stack ragged rows into `[num_rows, width]`; width None: the widest row rounded up to a
    power of two."""
    longest = max(map(len, rows), default=0)
    if width is None:
        width = 1 << max(0, longest - 1).bit_length()
    assert longest <= width, f"a row has {longest} entries, more than the table's {width}"
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
    `top_logprobs [R, k] f32` the k most likely tokens, most likely first. When no row asked for
    logprobs, the sampler skips them and these hold zeros.
    """

    token_ids: jax.Array
    sampled_logprob: jax.Array | None = None
    sampled_rank: jax.Array | None = None
    top_ids: jax.Array | None = None
    top_logprobs: jax.Array | None = None


def sample(logits: jax.Array, tensors: SamplingTensors, step_key: jax.Array) -> SamplerOutput:
    """Sample one token per row of `logits [R, V]`; jit it (one program whatever the rows ask)."""
    logits = logits.astype(jnp.float32)
    # Rows that are plain greedy need the argmax alone; every other stage sits in one branch,
    # which returns token ids (small) rather than adjusted logits.
    adjusted = (jnp.any(tensors.logit_bias_ids >= 0) | jnp.any(tensors.temperature != 0.0)
                | _any_constrained(tensors))
    if tensors.prompt_mask is not None:
        adjusted |= jnp.any(_uses_penalties(tensors))
    token_ids = jax.lax.cond(adjusted, _sample_adjusted, lambda logits, tensors, step_key: argmax(logits),
                             logits, tensors, step_key)
    if tensors.num_logprobs is None:
        return SamplerOutput(token_ids=token_ids)
    logprobs = compute_if(jnp.any(tensors.wants_logprobs),
                          functools.partial(compute_logprobs, num_logprobs=tensors.num_logprobs),
                          logits, token_ids)
    return dataclasses.replace(logprobs, token_ids=token_ids)


def needs_only_argmax(tensors: SamplingTensors) -> bool:
    """Whether `argmax(logits)` is all that `sample` would do (host tensors): every row greedy,
    with no bias, ban, penalty, token mask or logprobs. An engine then runs the argmax alone: the
    conditionals of `sample` take a copy of the logits (~2 ms for [64, 49152] on a CPU)."""
    return not (np.any(tensors.temperature) or np.any(tensors.logit_bias_ids >= 0)
                or np.any(tensors.wants_logprobs) or np.any(_uses_penalties(tensors))
                or np.any(tensors.token_bitmask != -1))


def _sample_adjusted(logits: jax.Array, tensors: SamplingTensors, step_key: jax.Array) -> jax.Array:
    """Token mask, bias and penalties, then the argmax for greedy rows and a draw for the others."""
    logits = apply_if(_any_constrained(tensors), apply_token_bitmask, logits, tensors.token_bitmask)
    logits = apply_logit_bias(logits, tensors.logit_bias_ids, tensors.logit_bias_values)
    if tensors.prompt_mask is not None:
        logits = apply_if(jnp.any(_uses_penalties(tensors)), _penalize, logits, tensors)
    greedy_ids = argmax(logits)
    return jax.lax.cond(jnp.any(tensors.temperature != 0.0), _sample_random_rows,
                        lambda logits, tensors, step_key, greedy_ids: greedy_ids,
                        logits, tensors, step_key, greedy_ids)


def apply_if(flag: jax.Array, stage: Callable, logits: jax.Array, *args) -> jax.Array:
    """`stage(logits, *args)` where `flag` holds, else `logits` unchanged; XLA runs only the
    branch taken, so a stage no row needs costs one flag."""
    return jax.lax.cond(flag, stage, lambda logits, *_: logits, logits, *args)


def compute_if(flag: jax.Array, fn: Callable, *args):
    """`fn(*args)` where `flag` holds, else zeros shaped as its result: the shapes never depend
    on whether anything asked for it, and XLA runs only the branch taken."""

    def zeros(*args):
        return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(fn, *args))

    return jax.lax.cond(flag, fn, zeros, *args)


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


def apply_token_bitmask(logits: jax.Array, bitmask: jax.Array) -> jax.Array:
    """Tokens whose bit is clear in `bitmask [R, ceil(V / 32)] i32` to -inf; others unchanged.

    The bits unpack by a broadcast shift (`[R, W, 32]`), no gather: bit b of word w is token
    32 w + b. Bits past V (the last word's tail) are ignored."""
    num_rows, vocab_size = logits.shape
    bits = jnp.right_shift(bitmask[:, :, None], jnp.arange(32, dtype=jnp.int32)) & 1
    allowed = bits.reshape(num_rows, -1)[:, :vocab_size] != 0
    return jnp.where(allowed, logits, -jnp.inf)


def _any_constrained(tensors: SamplingTensors) -> jax.Array:
    return jnp.any(tensors.token_bitmask != -1)


def _uses_penalties(tensors: SamplingTensors) -> jax.Array:
    return ((tensors.presence_penalty != 0.0) | (tensors.frequency_penalty != 0.0)
            | (tensors.repetition_penalty != 1.0))


def _penalize(logits: jax.Array, tensors: SamplingTensors) -> jax.Array:
    """`apply_penalties` with each row's token statistics gathered from the tables."""
    rows = jnp.arange(logits.shape[0]) if tensors.slot is None else tensors.slot
    return apply_penalties(logits, tensors.prompt_mask[rows], tensors.output_counts[rows],
                           tensors.presence_penalty, tensors.frequency_penalty, tensors.repetition_penalty)


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


def _sample_random_rows(logits: jax.Array, tensors: SamplingTensors, step_key: jax.Array,
                        greedy_ids: jax.Array) -> jax.Array:
    """A drawn token for the rows with a temperature, `greedy_ids` for the others."""
    return jnp.where(tensors.temperature == 0.0, greedy_ids, _sample_random(logits, tensors, step_key))


def _sample_random(logits: jax.Array, tensors: SamplingTensors, step_key: jax.Array) -> jax.Array:
    temperature = jnp.where(tensors.temperature == 0.0, 1.0, tensors.temperature)
    logits = logits / temperature[:, None]
    logits = apply_min_p(logits, tensors.min_p)
    vocab_size = logits.shape[1]
    filters = (((tensors.top_k > 0) & (tensors.top_k < vocab_size)) | (tensors.top_p < 1.0)) & (
        tensors.temperature != 0.0)
    logits = apply_if(jnp.any(filters), apply_top_k_top_p, logits, tensors.top_k, tensors.top_p)
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
    """One typed key per row: from (seed, output position) if seeded, else (step key, row). One
    `fold_in` over the chosen (key, data) pairs: each one is a threefry hash to compile and run."""
    num_rows = tensors.temperature.shape[0]
    seeded = tensors.has_seed[:, None]
    base = jnp.where(seeded, jnp.asarray(tensors.seed, jnp.uint32), jax.random.key_data(step_key)[None, :])
    data = jnp.where(seeded[:, 0], tensors.output_position, jnp.arange(num_rows, dtype=jnp.int32))
    return jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(base, impl=_PRNG_IMPL), data)


def make_step_key(seed: int, step: int) -> jax.Array:
    """The key `sample` needs for engine step `step`, from the engine-wide `seed` (threefry)."""
    return jax.random.fold_in(jax.random.key(seed, impl=_PRNG_IMPL), step)


def pad_rows(tensors: SamplingTensors, num_rows: int) -> SamplingTensors:
    """Host sampling tensors padded to `num_rows` with neutral (greedy, no-op) rows."""
    have = tensors.temperature.shape[0]
    if have == num_rows:
        return tensors
    neutral = SamplingTensors.from_params([], vocab_size=32 * tensors.token_bitmask.shape[1], num_rows=num_rows - have,
                                          num_logprobs=tensors.num_logprobs, bias_width=tensors.logit_bias_ids.shape[1])
    return jax.tree.map(lambda value, pad: np.concatenate([value, pad]), tensors, neutral)


def place_rows(tensors: SamplingTensors, row_index: np.ndarray, num_rows: int) -> SamplingTensors:
    """Host sampling tensors (plan order) padded to `num_rows` neutral rows, row i at `row_index[i]`."""
    padded = pad_rows(tensors, num_rows)
    have = len(row_index)
    if np.array_equal(row_index, np.arange(have)):
        return padded
    order = np.empty(num_rows, np.int64)  # padded row feeding each batch row
    order[row_index] = np.arange(have)
    rest = np.ones(num_rows, bool)
    rest[row_index] = False
    order[rest] = np.arange(have, num_rows)
    return jax.tree.map(lambda value: value[order], padded)
