"""The model runner: device-resident request state and one jitted step per bucket.

Per-request state lives on device in fixed-capacity arrays indexed by a request's *slot*
(vLLM's Model Runner V2): `history [slots, max_model_len]` holds every token id the request
has (prompt, then sampled tokens written by the step itself), `block_tables [slots,
max_blocks]` its KV blocks. The host uploads only diffs: a new request's prompt, newly
allocated blocks. A step receives, per scheduled row, its slot, how many tokens are already in
the KV cache and how many it computes now; everything else (input ids, positions, slot mapping,
the step's block tables, logits indices) is gathered on device. Sampled tokens are written into
`history`, so the next step can be dispatched before this one's tokens reach the host (async
scheduling); the host reads them one step behind through an asynchronous copy. Which request
holds which slot, and the diffs to upload, follow the scheduler's output (jaxserve/input_batch.py).

The KV cache is one `KVCache` per layer in the layout of the model family's KV spec
(models/kv_spec.py). Shapes are padded to buckets (tokens T, rows R) so a steady state never
recompiles. Every row belongs to one dp shard (`RowPlan.shard`, whose KV blocks it uses) and the
batch is shard-major: tokens [dp * T], rows [dp * R], every shard padded to the same bucket, the
largest any shard needs (models/dp_attention.py); one shard is the dp = 1 case. Block tables are
always `max_model_len / block_size` wide: attention visits only the key chunks the longest
sequence of the step reaches, so a wide table costs nothing.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
import threading
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from jaxserve.compilation_cache import bypassing_cache
from jaxserve.compile_stats import compile_counter
from jaxserve.config import EngineConfig, bucket_for, cdiv
from jaxserve.eplb import eplb_hook
from jaxserve.input_batch import InputBatch, RowPlan, StepInputs, shard_major_index, step_inputs
from jaxserve.kv.sizing import KVPlan
from jaxserve.parallel import parallel_model
from jaxserve.sampler import (SamplerOutput, SamplingTensors, argmax, compute_logprobs, count_sampled_tokens,
                              make_step_key, needs_only_argmax, place_rows, sample, token_counts)
from jaxserve.sampling_params import SamplingParams
from jaxserve.scheduler import SchedulerOutput
from jaxserve.spec_decode.draft_head import DraftHead
from jaxserve.spec_decode.rejection_sampler import scored_positions, verify_and_record
from jaxserve.token_rows import token_rows
from models.kv_spec import KVCache, KVSpec, allocate
from models.layers import AttentionMetadata
from models.mesh import replicated, shard_state, spec_for

logger = logging.getLogger("jaxserve.runner")


@dataclasses.dataclass
class StepPlan:
    rows: list[RowPlan]
    sampling: SamplingTensors  # host arrays (`ModelRunner.sampling_tensors`), one row per plan row
    prompt_logprobs: bool = False  # score every computed position against the next token


class StepResult:
    """Device outputs of one dispatched step (`arrays`, those the plan asked for; `per_token`
    names the ones with a row per token); `get()` waits for the host copy. Host arrays come back
    in plan order: `row_index` / `token_index` name each plan row's / token's place in
    the shard-major batch."""

    def __init__(self, num_rows: int, arrays: dict[str, jax.Array], per_token=(), row_index=None,
                 token_index=None):
        self.num_rows = num_rows
        self._index = {"row": row_index, "token": token_index}
        self._per_token = set(per_token)
        self._arrays = arrays
        for value in self._arrays.values():
            value.copy_to_host_async()
        self._host = None

    def get(self) -> dict[str, np.ndarray]:
        if self._host is None:
            self._host = {k: np.asarray(v) for k, v in self._arrays.items()}
            for key, value in self._host.items():
                index = self._index["token" if key in self._per_token else "row"]
                if index is not None:
                    self._host[key] = value[index]
        return self._host


class ModelRunner:
    """`kv_spec`: the model family's cache layout (models/registry.py `kv_spec`).
    `num_lookahead_tokens`: extra positions each row carries logits for (the k draft tokens
    speculative decoding verifies); 0 samples one token per row. `kv_groups` (a `KVPlan` with
    sliding-window KV groups, jaxserve/kv/cache_manager.py): each group's layers get its pool's
    blocks and the step its own block tables; None: one group of `num_blocks`. `draft_method`
    "eagle3" (with its `draft_head`) or "mtp": each step also drafts each row's next k tokens on
    device (jaxserve/spec_decode/draft_head.py)."""

    def __init__(self, model: nnx.Module, config: EngineConfig, *, kv_spec: KVSpec, num_blocks: int,
                 max_model_len: int, kv_dtype, eos_token_ids: Sequence[int] = (), num_lookahead_tokens: int = 0,
                 kv_groups: KVPlan | None = None, draft_method: str | None = None, draft_head: nnx.Module | None = None):
        compile_counter()  # counting from here: warm-up reports what it compiled
        self.config = config
        self.kv_spec = kv_spec
        self.model_config = model.config
        self.block_size = config.block_size
        self.num_blocks = num_blocks  # per dp shard (group 0's)
        self.group_windows = (None,) if kv_groups is None else kv_groups.group_windows
        self.group_blocks = (num_blocks,) if kv_groups is None else kv_groups.group_blocks
        self.layer_groups = (0,) * kv_spec.num_layers if kv_groups is None else kv_groups.layer_groups
        self.dp = config.data_parallel_size
        self.max_model_len = max_model_len
        self.max_blocks = cdiv(max_model_len, config.block_size)
        self.num_slots = config.max_num_reqs
        self.max_rows = self.dp * config.max_num_seqs  # rows of one step, at most
        self.input_batch = InputBatch(self.num_slots, len(self.group_windows))
        # Logit rows per request row: the step scores k lookahead tokens too (the row layout
        # speculative decoding verifies drafts in); the verifier then samples 1 to k + 1 tokens
        # per row (jaxserve/spec_decode/rejection_sampler.py), the plain sampler one.
        self.samples_per_row = 1 + num_lookahead_tokens
        self.vocab_size = model.config.vocab_size
        # The sampler's fixed widths (jaxserve/sampler.py): whatever a batch asks for, one shape.
        self.eos_token_ids = list(eos_token_ids)
        self.num_logprobs = min(config.max_logprobs, self.vocab_size)
        self.bias_width = config.max_logit_bias + config.max_stop_token_ids + len(self.eos_token_ids)
        self.token_buckets = config.token_bucket_sizes()
        self.request_buckets = config.request_bucket_sizes()
        # Parallel engines (jaxserve/parallel.py): a mesh, every state array placed on it.
        self.mesh = None
        if config.parallel.uses_mesh:
            model, self.mesh = parallel_model(model, config)
        self.graphdef, self.params = nnx.split(model)
        mc = model.config
        # Device state is created *committed* to the device: jit keys its cache on whether each
        # argument is committed, and a step's outputs are committed, so uncommitted initial
        # arrays (plain jnp.zeros) made every warm-up executable miss once state had passed
        # through a step or an update, recompiling each bucket again during serving.
        self.device = jax.devices()[0] if self.mesh is None else replicated(self.mesh)
        dev = self.device
        if self.mesh is not None:
            self.params = shard_state(self.params, self.mesh)
        # Step hook (jaxserve/eplb.py): expert loads and rebalancing; None without expert parallelism.
        self.eplb = eplb_hook(self.graphdef, self.params, config, self.mesh)

        # dp > 1: shard s holds blocks [s * num_blocks, (s + 1) * num_blocks) (models/dp_attention.py),
        # the block axis split over dp ("cache_blocks"), KV heads over tp.
        def placement(shape, logical_axes):
            return dev if self.mesh is None else NamedSharding(self.mesh, spec_for(logical_axes, shape, self.mesh))

        self.kv_caches = [allocate(layer, self.dp * self.group_blocks[group], config.block_size, kv_dtype, placement)
                          for layer, group in zip(kv_spec.layers, self.layer_groups)]
        if jnp.dtype(kv_dtype).itemsize == 1:  # FP8: per-layer scales travel with the caches
            self.set_kv_scales(np.ones((kv_spec.num_layers, len(kv_spec.layers[0].arrays)), np.float32))
        # One extra column so a token sampled at position max_model_len - 1 + 1 has a place.
        self.history = jnp.zeros((self.num_slots, max_model_len + 1), jnp.int32, device=dev)
        # Row group * num_slots + slot: the slot's table in KV group `group` (jaxserve/input_batch.py).
        self.block_tables = jnp.zeros((len(self.group_windows) * self.num_slots, self.max_blocks), jnp.int32,
                                      device=dev)
        # Penalty statistics per slot, always there (5 bytes per slot and vocabulary entry): a
        # step that needs none has the same inputs as one that does, and skips them at run time.
        self.penalty_state = (jnp.zeros((self.num_slots, self.vocab_size), bool, device=dev),
                              jnp.zeros((self.num_slots, self.vocab_size), jnp.int32, device=dev))
        # Diff uploads go in chunks of at most this many writes, every size up to it compiled by
        # warmup(): a full-length prompt, or a step's tokens on every dp shard, in one chunk.
        self.max_update_size = _pow2(max(max_model_len, self.dp * config.max_num_batched_tokens), minimum=64)
        self._step_count = 0
        # Distinct step signatures dispatched so far: one compiled executable each.
        self.step_variants: set[tuple] = set()
        # On a mesh, outputs keep exactly their inputs' shardings, so a state array that went
        # through a step hits the same executable (jit keys on the sharding objects).
        kv_out = jax.tree.map(lambda a: a.sharding, self.kv_caches)
        mesh_out = self.mesh is not None
        # A step is three programs: the model per (tokens, rows) bucket; the sampler per rows
        # bucket (two: argmax only, or everything), which records the sampled tokens; prompt
        # logprobs per tokens bucket, run only when a row asks. The sampler does not compile
        # again for every tokens bucket.
        self.drafter = None if draft_method is None else DraftHead(
            self, draft_method, draft_head, num_lookahead_tokens, kv_dtype, placement)
        self._step_fn = jax.jit(self._step, donate_argnums=(1,), static_argnames=("num_tokens",),
                                **({"out_shardings": (dev, dev, kv_out, dev, dev)} if mesh_out else {}))
        sampler = _sample_and_record if not num_lookahead_tokens else functools.partial(
            verify_and_record, num_speculative_tokens=num_lookahead_tokens)
        self._sample_fn = jax.jit(sampler, donate_argnums=(3, 4), static_argnames=("argmax_only",),
                                  **({"out_shardings": (dev, dev, dev)} if mesh_out else {}))
        self._prompt_fn = jax.jit(self._prompt_logprobs, **({"out_shardings": dev} if mesh_out else {}))
        self._update_fn = jax.jit(_apply_updates, donate_argnums=(0, 1), **({"out_shardings": (dev, dev)} if mesh_out else {}))
        self._reset_fn = jax.jit(_reset_penalty_rows, donate_argnums=(0,),
                                 **({"out_shardings": (dev, dev)} if mesh_out else {}))
        self._poison_fn = jax.jit(_poison_blocks, donate_argnums=(0,), **({"out_shardings": kv_out} if mesh_out else {}))
        self.warmup_seconds: dict | None = None  # per warm-up stage, once warmup() ran

    # ---- device state ----

    def update_states(self, scheduled: SchedulerOutput) -> list[RowPlan]:
        """Take in what the scheduler changed (slots, tokens, block tables; uploaded with the
        next step); -> the step's rows."""
        return self.input_batch.update(scheduled)

    def set_kv_scales(self, scales) -> None:
        """FP8 scales, one per cached array of each layer (`[layers, arrays]`), as device scalars
        beside each layer's cache. Same shapes and dtypes every time, so setting them never
        recompiles the step; set them before any block is written (EngineCore does, at start-up)."""
        scales = np.asarray(scales, np.float32)
        shape = (len(self.kv_caches), len(self.kv_caches[0].arrays))
        if scales.shape != shape or not np.all(np.isfinite(scales)) or np.any(scales <= 0):
            raise ValueError(f"kv_scales must be {shape} finite positive values, got {scales!r}")
        self.kv_caches = [KVCache(cache.arrays, tuple(jax.device_put(jnp.float32(x), self.device) for x in row))
                          for cache, row in zip(self.kv_caches, scales)]

    def poison_blocks(self, block_ids: Sequence[int], shard: int = 0, group: int = 0) -> None:
        """Debug: overwrite freed blocks (ids local to dp `shard` and KV `group`) with NaN (only
        for float caches)."""
        if not block_ids or not jnp.issubdtype(self.kv_caches[0].dtype, jnp.floating):
            return
        num_blocks = self.group_blocks[group]
        ids = np.asarray(block_ids, np.int32) + shard * num_blocks
        ids = jnp.asarray(_pad(ids, _pow2(len(block_ids)), fill=self.dp * num_blocks))
        layers = [i for i, g in enumerate(self.layer_groups) if g == group]
        poisoned = self._poison_fn([self.kv_caches[i] for i in layers], ids)
        for i, cache in zip(layers, poisoned):
            self.kv_caches[i] = cache

    def _flush_updates(self) -> None:
        """Upload the writes the input batch staged, in chunks of sizes warmup() compiled."""
        history, tables, resets = self.input_batch.take_writes()
        for start in range(0, max(len(history), len(tables)), self.max_update_size):
            history_writes = history[start: start + self.max_update_size]
            table_writes = tables[start: start + self.max_update_size]
            # One padded size for both lists: few shapes, all compiled by warmup().
            size = _pow2(max(len(history_writes), len(table_writes)), minimum=64)
            self._apply_updates(history_writes, table_writes, size)
        # After the history writes: the statistics read the prompts from the history.
        for start in range(0, len(resets), self.max_rows):
            self._reset_penalties(resets[start: start + self.max_rows])

    def _apply_updates(self, history_writes, table_writes, size: int) -> None:
        hist = _triples(history_writes, self.num_slots, size)
        table = _triples(table_writes, len(self.group_windows) * self.num_slots, size)
        self.history, self.block_tables = self._update_fn(self.history, self.block_tables, *hist, *table)

    def _reset_penalties(self, resets: Sequence[tuple[int, int]]) -> None:
        """Restart the penalty statistics of up to `max_rows` (slot, prompt length) pairs."""
        slots = np.full(self.max_rows, self.num_slots, np.int32)  # padding: out of range, dropped
        prompt_lens = np.zeros(self.max_rows, np.int32)
        for i, (slot, prompt_len) in enumerate(resets):
            slots[i], prompt_lens[i] = slot, prompt_len
        self.penalty_state = self._reset_fn(self.penalty_state, self.history, jnp.asarray(slots),
                                            jnp.asarray(prompt_lens))

    # ---- the step ----

    def buckets_for(self, rows: Sequence[RowPlan]) -> tuple[int, int]:
        """(tokens, rows) bucket per shard: the largest any dp shard needs. The scheduler gives
        each shard at most `max_num_batched_tokens` tokens and `max_num_seqs` rows, the largest
        buckets (jaxserve/scheduler.py), so every step lands in `step_buckets()`."""
        tokens, counts = np.zeros(self.dp, np.int64), np.zeros(self.dp, np.int64)
        for r in rows:
            tokens[r.shard] += r.num_new
            counts[r.shard] += 1
        num_tokens = bucket_for(int(tokens.max()), self.token_buckets)
        num_rows = bucket_for(int(counts.max()), self.request_buckets)
        if num_rows == 1 and num_tokens not in one_row_token_buckets(self.token_buckets, self.request_buckets):
            num_rows = self.request_buckets[1]
        return num_tokens, num_rows

    def execute(self, plan: StepPlan) -> StepResult:
        """Dispatch one step; returns at once, the device runs it in the background."""
        self._flush_updates()
        num_tokens, num_rows = self.buckets_for(plan.rows)
        row_index, token_index = shard_major_index(plan.rows, num_tokens, num_rows)
        inputs = self._device_inputs(step_inputs(plan.rows, row_index, self.dp, num_rows))
        sampling = place_rows(plan.sampling, row_index, self.dp * num_rows)
        step_key = make_step_key(self.config.seed, self._step_count)
        self._step_count += 1
        out, prompt_lp, drafts = self._run_step(inputs, sampling, step_key, plan.prompt_logprobs, num_tokens)
        # Only what some row asked for comes back to the host.
        arrays = {"token_ids": out.token_ids, **prompt_lp}
        if self.samples_per_row > 1:  # [R, k + 1] tokens, the first num_tokens of each row real
            arrays["num_tokens"] = out.num_tokens
        if drafts is not None:  # [R, k]: each row's next drafts
            arrays["draft_token_ids"] = drafts
        if plan.sampling.wants_logprobs.any():
            arrays.update(sampled_logprob=out.sampled_logprob, sampled_rank=out.sampled_rank, top_ids=out.top_ids,
                          top_logprobs=out.top_logprobs)
        return StepResult(len(plan.rows), arrays, prompt_lp.keys(), row_index, token_index)

    def _device_inputs(self, host: dict[str, np.ndarray]) -> StepInputs:
        return StepInputs(**{name: jnp.asarray(value) for name, value in host.items()})

    def sampling_tensors(self, params: Sequence[SamplingParams], output_lengths: Sequence[int]) -> SamplingTensors:
        """Host sampling tensors of a step's rows (`output_lengths`: tokens each has generated), in
        the one layout every compiled step takes, whatever the rows ask for."""
        return SamplingTensors.from_params(
            params, vocab_size=self.vocab_size, output_lengths=output_lengths, eos_token_ids=self.eos_token_ids,
            num_logprobs=self.num_logprobs, bias_width=self.bias_width)

    def _run_step(self, inputs, sampling, step_key, prompt_logprobs: bool, num_tokens):
        self.step_variants.add(_signature(num_tokens, inputs, sampling))
        logits, scored_positions, self.kv_caches, loads, features = self._step_fn(
            self.params, self.kv_caches, self.history, self.block_tables, inputs, num_tokens=num_tokens)
        out, self.history, self.penalty_state = self._sample_fn(
            logits, sampling, step_key, self.history, self.penalty_state, inputs, argmax_only=needs_only_argmax(sampling))
        drafts = None
        if self.drafter is not None:  # after the sampler: the head reads the tokens it wrote
            drafts = self.drafter.propose(self.params, features, self.history, self.block_tables, inputs,
                                          out.num_tokens, num_tokens)
        prompt_lp = self._prompt_fn(self.params, *scored_positions) if prompt_logprobs else {}
        if self.eplb is not None:
            self.params = self.eplb.after_step(loads, self.params)
        return out, prompt_lp, drafts

    def _step(self, params, kv_caches, history, block_tables, inputs: StepInputs, *, num_tokens: int):
        """The model on one step's tokens: the logits `[R, V]` of each row's last token (with k
        lookahead tokens, `[logit_rows, V]`), and for prompt logprobs every token's hidden state and the
        token that follows it."""
        model = nnx.merge(self.graphdef, params)
        if self.eplb is not None:
            self.eplb.before_forward(model)
        block_size = self.block_size
        cu, num_seqs = inputs.query_start_loc, inputs.num_seqs
        row, offset, valid, last, q_lens = token_rows(cu, num_seqs, num_tokens)
        if self.dp == 1:  # one shard: the model sees a plain ragged batch
            cu, num_seqs = cu[0], num_seqs[0]
        positions = jnp.where(valid, inputs.num_computed[row] + offset, 0)
        slots = inputs.slots[row]
        input_ids = jnp.where(valid, history[slots, positions], 0)
        group_tables, group_slots = [], []
        for group in range(len(self.group_windows)):  # each KV group's tables and cache slots
            tables = block_tables[group * self.num_slots + inputs.slots]
            block = tables[row, positions // block_size]
            group_tables.append(tables)
            group_slots.append(jnp.where(valid, block * block_size + positions % block_size, 0))
        extra = {} if len(group_tables) == 1 else dict(
            group_windows=self.group_windows[1:], group_slot_mapping=jnp.stack(group_slots[1:]),
            group_block_tables=jnp.stack(group_tables[1:]))
        meta = AttentionMetadata(
            slot_mapping=group_slots[0], query_start_loc=cu,
            seq_lens=inputs.num_computed + q_lens, block_tables=group_tables[0], num_seqs=num_seqs,
            token_mask=valid, **extra,
        )
        capture = () if self.drafter is None else self.drafter.capture
        hidden, kv_caches, *captured = model(input_ids, positions, kv_caches, meta, **({"capture": capture} if capture else {}))
        # A draft head's features: EAGLE-3's captured streams, MTP's final hidden states.
        features = None if self.drafter is None else (captured[0] if capture else hidden)
        next_ids = jnp.where(valid, history[slots, positions + 1], 0)
        # Each row's last token; with speculation, each row's last 1 + n tokens (n drafts), packed
        # (jaxserve/spec_decode/rejection_sampler.py): `logit_rows` rows, not R * (1 + k).
        logits_index = last
        if self.samples_per_row > 1:
            logits_index = scored_positions(last, inputs.num_drafts, self.logit_rows(self.dp * num_tokens, len(last)))
        return (model.compute_logits(hidden[logits_index]), (hidden, next_ids), kv_caches,
                None if self.eplb is None else self.eplb.after_forward(model), features)

    def _prompt_logprobs(self, params, hidden, next_ids):
        """Every computed position's logits scored against the token that follows it."""
        model = nnx.merge(self.graphdef, params)
        scored = compute_logprobs(model.compute_logits(hidden), next_ids, self.num_logprobs)
        return {"prompt_token_ids": scored.token_ids, "prompt_token_logprob": scored.sampled_logprob,
                "prompt_token_rank": scored.sampled_rank, "prompt_top_ids": scored.top_ids,
                "prompt_top_logprobs": scored.top_logprobs}

    # ---- warm-up and accounting ----

    def warmup(self) -> float:
        """Compile every bucket's programs (one each, whatever the rows will ask of the sampler)
        and the diff uploads; returns seconds. Where the time went lands in `warmup_seconds` (an
        8B model took 139-158 s on an H200 host: the next GPU run says which stage)."""
        start = time.perf_counter()
        buckets = self.step_buckets()
        self.precompile(buckets)
        precompiled = time.perf_counter()
        scored, sampled = set(), set()  # prompt logprobs once per tokens bucket, samplers per logits shape
        for num_tokens, num_rows in buckets:
            self._compile_one(num_tokens, num_rows, prompt_logprobs=num_tokens not in scored,
                              full_sampler=self.logit_rows(num_tokens, num_rows) not in sampled)
            scored.add(num_tokens)
            sampled.add(self.logit_rows(num_tokens, num_rows))
        stepped = time.perf_counter()
        size = 64
        while size <= self.max_update_size:
            self._apply_updates([], [], size)
            size *= 2
        self._reset_penalties([])
        jax.block_until_ready(self.kv_caches)
        end = time.perf_counter()
        self.warmup_seconds = {"precompile": precompiled - start, "steps": stepped - precompiled,
                               "uploads": end - stepped}
        return end - start

    def precompile(self, buckets, workers: int | None = None) -> int:
        """Compile the buckets' programs on several threads into jax's persistent cache, from which
        the warm-up's steps then load them; returns how many buckets were compiled. XLA compiles one
        program on about one core: a GPU host's cores compile an 8B model's buckets together in
        the time of one. Only on one device without a mesh (a mesh context is per thread) and with
        the cache on; anything that goes wrong leaves the warm-up to compile as before."""
        workers = workers or min(len(buckets), max(1, (os.cpu_count() or 1) // 2))
        if self.mesh is not None or not jax.config.jax_compilation_cache_dir or workers < 2 or len(buckets) < 2:
            return 0

        # The sampler once per rows bucket, prompt logprobs once per tokens bucket.
        first_with_rows, first_with_tokens = {}, {}
        for bucket in buckets:
            first_with_tokens.setdefault(bucket[0], bucket)
            first_with_rows.setdefault(self.logit_rows(*bucket), bucket)

        def compile_one(bucket):
            num_tokens, num_rows = bucket
            inputs, sampling = self._padding_step(num_rows)
            step = self._step_fn.lower(self.params, self.kv_caches, self.history, self.block_tables, inputs,
                                       num_tokens=num_tokens)
            step.compile()
            logits_info, scored_info = step.out_info[:2]
            logits, hidden, next_ids = (jnp.zeros(x.shape, x.dtype, device=self.device)
                                        for x in (logits_info, *scored_info))
            if first_with_rows[self.logit_rows(num_tokens, num_rows)] == bucket:
                for argmax_only in (True, False):
                    self._sample_fn.lower(logits, sampling, make_step_key(0, 0), self.history, self.penalty_state,
                                          inputs, argmax_only=argmax_only).compile()
            if first_with_tokens[num_tokens] == bucket:
                self._prompt_fn.lower(self.params, hidden, next_ids).compile()

        try:
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                list(pool.map(compile_one, buckets))
        except Exception as err:  # noqa: BLE001 - the sequential warm-up compiles what is missing
            logger.warning("parallel compile failed (%s: %s); compiling one bucket at a time", type(err).__name__, err)
            return 0
        return len(buckets)

    def _compile_one(self, num_tokens: int, num_rows: int, prompt_logprobs: bool = True,
                     full_sampler: bool = True) -> None:
        """Run one all-padding step of the given shape (it only writes the null block). Inputs
        are built as a real step builds them, so their uploads compile here too. Padding rows
        take the argmax-only sampler; `full_sampler` compiles the other one as well."""
        inputs, sampling = self._padding_step(num_rows)
        self._run_step(inputs, sampling, make_step_key(0, 0), prompt_logprobs, num_tokens)
        if full_sampler:
            logits = jnp.zeros((self.logit_rows(self.dp * num_tokens, len(sampling.temperature)), self.vocab_size),
                               jnp.float32, device=self.device)
            self._sample_fn.lower(logits, sampling, make_step_key(0, 0), self.history, self.penalty_state, inputs,
                                  argmax_only=False).compile()

    def _padding_step(self, num_rows: int) -> tuple[StepInputs, SamplingTensors]:
        """Inputs of a step with no real row, shaped as a real step of `num_rows` rows (per shard)."""
        no_rows = np.zeros(0, np.int64)
        inputs = self._device_inputs(step_inputs([], no_rows, self.dp, num_rows))
        return inputs, place_rows(self.sampling_tensors([], []), no_rows, self.dp * num_rows)

    def compiled_step_text(self, num_tokens: int, num_rows: int) -> str:
        """The compiled HLO of one bucket's model program (tests inspect its collectives and
        their scopes), compiled afresh: a persistently cached one may carry stale scope names."""
        inputs, _ = self._padding_step(num_rows)
        lowered = self._step_fn.lower(
            self.params, self.kv_caches, self.history, self.block_tables, inputs, num_tokens=num_tokens)
        with bypassing_cache():
            return lowered.compile().as_text()

    def logit_rows(self, num_tokens: int, num_rows: int) -> int:
        """Logit rows of a step of `num_tokens` tokens and `num_rows` rows (both over all shards):
        one per row; with k lookahead tokens, each row's 1 + n scored tokens packed, at most
        the step's tokens (drafts are tokens of the step)."""
        if self.samples_per_row == 1:
            return num_rows
        return min(num_tokens, num_rows * self.samples_per_row)

    def step_buckets(self) -> list[tuple[int, int]]:
        """Every (tokens, rows) bucket pair a step can land in: rows bucket r is reachable with
        token bucket t when the fewest rows that map to r (one more than the bucket below it)
        fit in t tokens. E.g. 14 single-token rows land in (16, 32) with row buckets (8, 32)."""
        pairs, one_row_tokens = [], one_row_token_buckets(self.token_buckets, self.request_buckets)
        for num_tokens in self.token_buckets:
            below = 0
            for num_rows in self.request_buckets:
                if below + 1 <= num_tokens and (num_rows > 1 or num_tokens in one_row_tokens):
                    pairs.append((num_tokens, num_rows))
                below = num_rows
        return pairs

    def num_buckets(self) -> int:
        return len(self.step_buckets())

    @property
    def num_dispatched_steps(self) -> int:
        """Steps dispatched by `execute` (warm-up excluded): the step index multi-host events name."""
        return self._step_count


def one_row_token_buckets(token_buckets: tuple[int, ...], request_buckets: tuple[int, ...]) -> tuple[int, ...]:
    """The token buckets a 1-row bucket pairs with: the two smallest (one stream's decode step,
    and that step with drafts). A one-row prefill chunk lands in the next rows bucket, whose
    padding rows cost little beside its tokens; pairing every token bucket with one row compiled
    a program more per token bucket in every engine with derived buckets."""
    if len(request_buckets) < 2 or request_buckets[0] != 1:
        return token_buckets
    return token_buckets[:2]


def _signature(num_tokens, *trees) -> tuple:
    """What jit keys its cache on: static arguments, tree structures, leaf shapes and dtypes."""
    leaves, treedef = jax.tree.flatten(trees)
    return (num_tokens, treedef, tuple((np.shape(x), np.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype) for x in leaves))


def _sample_and_record(logits, sampling: SamplingTensors, step_key, history, penalty_state, inputs: StepInputs, *,
                       argmax_only: bool):
    """Sample the step's tokens (`argmax_only`: `needs_only_argmax` holds) and record them on
    device: in the history at each sampling row's position seq_len (rows that do not sample write
    out of bounds), and in the output counts of every row (R adds, so a slot's statistics are
    current whenever its request uses penalties)."""
    prompt_mask, output_counts = penalty_state
    if argmax_only:
        out = SamplerOutput(argmax(logits))
    else:
        out = sample(logits, dataclasses.replace(sampling, prompt_mask=prompt_mask, output_counts=output_counts,
                                                 slot=inputs.slots), step_key)
    seq_lens = inputs.num_computed + jnp.diff(inputs.query_start_loc, axis=-1).reshape(-1)
    write_row = jnp.where(inputs.do_sample, inputs.slots, history.shape[0])
    history = history.at[write_row, seq_lens].set(out.token_ids, mode="drop")
    return out, history, (prompt_mask, count_sampled_tokens(output_counts, write_row, out.token_ids))


def _reset_penalty_rows(penalty_state, history, slots, prompt_lens):
    """Penalty statistics of `slots` (out of range: padding, dropped) restarted: the prompt mask
    of the first `prompt_lens` tokens of each slot's history, no output counted yet."""
    prompt_mask, output_counts = penalty_state
    mask = token_counts(history[slots], prompt_lens, prompt_mask.shape[1]) > 0
    return prompt_mask.at[slots].set(mask, mode="drop"), output_counts.at[slots].set(0, mode="drop")


def _apply_updates(history, block_tables, hist_idx, hist_val, table_idx, table_val):
    history = history.at[hist_idx[:, 0], hist_idx[:, 1]].set(hist_val, mode="drop")
    block_tables = block_tables.at[table_idx[:, 0], table_idx[:, 1]].set(table_val, mode="drop")
    return history, block_tables


def _poison_blocks(kv_caches, block_ids):
    return [cache.replace(*(a.at[block_ids].set(jnp.nan, mode="drop") for a in cache.arrays)) for cache in kv_caches]


def _triples(writes, out_of_range_row, size):
    """(row, col, value) triples padded to `size`; padding rows fall outside and drop."""
    idx = np.full((size, 2), out_of_range_row, np.int32)
    val = np.zeros(size, np.int32)
    if writes:
        arr = np.asarray(writes, np.int32)
        idx[: len(writes)] = arr[:, :2]
        val[: len(writes)] = arr[:, 2]
    return jnp.asarray(idx), jnp.asarray(val)


def _pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, n - 1).bit_length())


def _pad(values: np.ndarray, size: int, fill) -> np.ndarray:
    out = np.full((size,) + values.shape[1:], fill, values.dtype)
    out[: len(values)] = values
    return out
