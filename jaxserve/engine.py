"""The engine loop: schedule, dispatch, and process results one step behind.

`EngineCore.step()` schedules step N and dispatches it to the device, then processes the
results of step N-1 (already copied to the host while N-1 ran): stop checks, detokenization,
outputs. So the host's work overlaps the device's (async scheduling), and a request that
finished at N-1 wastes one row of step N, whose token is dropped.

Speculative decoding (`speculative_config`, jaxserve/spec_decode/): the proposers draft from the
accepted tokens, so a speculating engine processes step N before it schedules N + 1 (the host's
work no longer overlaps the device's; measured in BENCHMARKS.md), then proposes each running
request's drafts, which the scheduler hands to its next row.

`n > 1` becomes n child requests `"{id}#{i}"`: the first computes the prompt, the others are
forked from it in the step that completes it and share its full prompt blocks; their outputs
are gathered under the parent id.

Structured outputs (jaxserve/structured_output.py): a constrained row's token mask depends on the
token it sampled in the step before. When a step about to be dispatched has such a row whose
previous token is still in flight, the host waits for that step's tokens, feeds them to the
matchers, fills the masks and dispatches; only then does it process the step before (stop checks,
detokenization, outputs), while the new one runs. The device idles from the end of one step to
the dispatch of the next: the matcher updates, the mask fill and the dispatch. Steps without a
constrained sampling row keep the full overlap.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jaxserve.compilation_cache import enable_compilation_cache
import pallas_kernels
from jaxserve.config import EngineConfig, bucket_for
from jaxserve.kv.host_tier import HostKVTier, HostTierConnector
from jaxserve.input_processor import ProcessedPrompt, check_priority, check_sampling_params, process_prompt
from jaxserve.kv.block_io import KVBlockIO
from jaxserve.kv.sharded_cache_manager import ShardedKVCacheManager
from jaxserve.kv.cache_manager import KVCacheManager
from jaxserve.kv.connector import KVConnector
from jaxserve.kv.scales import resolve_kv_scales
from jaxserve.kv.sizing import kv_group_windows, plan_kv_cache
from jaxserve.kv.transfer import KVLayout
from jaxserve.cpu_dtype import auto_dtype
from jaxserve.compile_stats import backend_compile_count, backend_compile_seconds
from jaxserve.metrics import EngineMetrics, StepStats
from jaxserve.model_runner import ModelRunner, StepPlan, StepResult
from jaxserve.output_processor import RequestState, position_logprobs
from jaxserve.outputs import RequestOutput
from jaxserve.request import Request, RequestStatus
from jaxserve.sampling_params import SamplingParams
from jaxserve.scheduler import Scheduler
from jaxserve.spec_decode.speculator import Speculator
from jaxserve.structured_output import StructuredOutputs, Verdict
from models.loader import LoadedModel, load_model
from models import registry
from models.registry import kv_spec

logger = logging.getLogger("jaxserve.engine")

_FINISH_STATUS = {"stop": RequestStatus.FINISHED_STOPPED, "length": RequestStatus.FINISHED_LENGTH_CAPPED,
                  "abort": RequestStatus.FINISHED_ABORTED}


@dataclasses.dataclass
class _Child:
    parent: str
    index: int
    request: Request
    params: SamplingParams
    scheduled: bool = False  # dispatched at least once (its first-token metrics started)


@dataclasses.dataclass
class _InFlight:
    """A dispatched step: which child each row was, whether it sampled, and its results."""

    scheduled: object  # the SchedulerOutput
    rows: list[tuple[str, bool]]
    prompt_rows: list[tuple[str, int, int, int]]  # (child id, first token row, first position, tokens)
    result: StepResult
    num_logprobs: int | None
    had_prefill: bool
    verdicts: dict[str, Verdict] | None = None  # constrained completions' matchers, fed ahead of processing


def _token_logprobs(host: dict, row: int, i: int) -> list:
    """(logprob, rank, top ids, top logprobs) of a sampling row's i-th token (with speculation
    the arrays have a token axis)."""
    fields = [host[name][row] for name in ("sampled_logprob", "sampled_rank", "top_ids", "top_logprobs")]
    return fields if "num_tokens" not in host else [field[i] for field in fields]


def _row_tokens(host: dict, row: int) -> list[int]:
    """The tokens a sampling row produced: one, or with speculation its first `num_tokens`."""
    if "num_tokens" not in host:
        return [int(host["token_ids"][row])]
    return host["token_ids"][row][: host["num_tokens"][row]].tolist()


def kernel_choices(loaded: LoadedModel, block_size: int, dtype, kv_dtype) -> dict:
    """Which kernel the model's attention and MoE layers will run, and why (pallas_kernels/dispatch.py):
    the same static facts the traced steps decide on."""
    from flax import nnx

    cfg = loaded.config
    backends = {}
    for _, module in nnx.iter_graph(loaded.model):
        for name in ("attention_backend", "moe_backend"):
            if isinstance(getattr(module, name, None), str):
                backends.setdefault(name, getattr(module, name))
    choices = {"attention": registry.attention_kernel(cfg, backends.get("attention_backend", "auto"),
                                                     block_size=block_size, q_dtype=dtype, cache_dtype=kv_dtype)}
    if cfg.is_moe:
        quant = loaded.model.config.quant_method  # the built model's: experts kept in fp8 or MXFP4
        weight_dtype, scale_block = {"fp8": (pallas_kernels.FP8_DTYPE, loaded.model.config.weight_block_size),
                                     "mxfp4": (jnp.uint8, (32, 1))}.get(quant, (None, None))
        choices["moe"] = pallas_kernels.choose_moe_kernel(
            backends.get("moe_backend", "auto"), hidden_size=cfg.hidden_size,
            intermediate_size=cfg.moe_intermediate_size, num_experts=cfg.num_experts, dtype=dtype,
            weight_dtype=weight_dtype, scale_block=None if scale_block is None else tuple(scale_block))
    return choices


def resolve_dtype(name: str, log: bool = False):
    """`dtype` as a jnp dtype; "auto" per backend and CPU (jaxserve/cpu_dtype.py), said in the log."""
    if name == "auto":
        name, why = auto_dtype(jax.default_backend())
        if log:
            logger.info("dtype auto: %s (%s)", name, why)
    return jnp.dtype(name)


def single_kv_group_reason(config: EngineConfig, kv_connector: KVConnector | None) -> str | None:
    """Why sliding-window layers cannot have KV groups of their own here, or None."""
    if config.disable_hybrid_kv_cache_manager:
        return "disable_hybrid_kv_cache_manager is set"
    if kv_connector is not None or config.cpu_kv_cache_bytes:
        return "a KV connector (host tier, disaggregation) moves every layer's blocks together"
    return None


class EngineCore:
    """`kv_connector` (jaxserve/kv/connector.py) moves KV in and out of this engine; by default
    the host tier when `config.cpu_kv_cache_bytes` > 0, else none. Speculative decoding
    (`config.speculative_config`, jaxserve/spec_decode/): `draft_loaded`, an already loaded draft
    model for method "draft_model", or an `Eagle3Head` for "eagle3" (else `model` is loaded)."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None,
                 kv_connector: KVConnector | None = None, draft_loaded: LoadedModel | None = None):
        self.config = config
        enable_compilation_cache(config.compilation_cache_dir, config.compilation_cache_max_bytes)
        dtype = resolve_dtype(config.dtype, log=True)
        self.loaded = loaded or load_model(
            config.model, dtype=dtype, attention_backend=config.attention_backend,
            use_cache=config.use_weight_cache, fp8_weights=config.fp8_weights)
        self.model_config = self.loaded.config
        self.tokenizer = self.loaded.tokenizer
        kv_dtype = pallas_kernels.FP8_DTYPE if config.kv_cache_dtype == "fp8" else dtype
        self.kv_spec = kv_spec(self.model_config)  # the family's cache layout (models/kv_spec.py)
        windows = kv_group_windows(self.model_config, single_kv_group_reason(config, kv_connector))
        spec = config.speculative_config
        head = self._draft_head(spec, draft_loaded, dtype, windows[0])
        head_layer = (head.kv_layer if head is not None else self.kv_spec.layers[0]
                      if self._uses_draft_head(spec) else None)  # "mtp": a layer like the target's
        self.kv_plan = plan_kv_cache(config, self.model_config, kv_dtype, windows, extra_bytes_per_token=0 if head_layer is None
                                     else sum(a.token_elements for a in head_layer.arrays) * jnp.dtype(kv_dtype).itemsize)
        self.max_model_len = self.kv_plan.max_model_len
        cache_seed = f"{self.loaded.source}|{jnp.dtype(kv_dtype).name}|{config.block_size}"
        if config.data_parallel_size > 1:  # one pool per dp shard, each the size of the budget
            if kv_connector is not None or config.cpu_kv_cache_bytes:
                raise ValueError("KV connectors (cpu_kv_cache_bytes, disaggregation) need data_parallel_size == 1, "
                                 f"got {config.data_parallel_size}")
            self.kv_manager = ShardedKVCacheManager(
                config.data_parallel_size, self.kv_plan.group_blocks, config.block_size, cache_seed=cache_seed,
                enable_caching=config.enable_prefix_caching, windows=self.kv_plan.group_windows)
        else:
            self.kv_manager = KVCacheManager(self.kv_plan.group_blocks, config.block_size, cache_seed=cache_seed,
                                             enable_caching=config.enable_prefix_caching,
                                             windows=self.kv_plan.group_windows)
        kv_scales = None  # fixed before serving starts: a scale never changes under written blocks
        if config.kv_cache_dtype == "fp8":
            kv_scales, origin = resolve_kv_scales(self.loaded, self.kv_spec, config.block_size)
            logger.info("FP8 KV cache: per-layer scales from %s (%s)", origin, ", ".join(
                f"{a.name} {kv_scales[:, i].min():.3g}..{kv_scales[:, i].max():.3g}"
                for i, a in enumerate(self.kv_spec.layers[0].arrays)))
        self.kv_layout = KVLayout.of(self.loaded.source, config.block_size, jnp.dtype(kv_dtype).name, self.kv_spec,
                                     () if kv_scales is None else kv_scales)
        if kv_connector is None:
            kv_connector = KVConnector()
            if config.cpu_kv_cache_bytes:
                kv_connector = HostTierConnector(HostKVTier(config.cpu_kv_cache_bytes, self.kv_layout))
        self.kv_connector = kv_connector
        self.scheduler = Scheduler(
            self.kv_manager, max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens, max_model_len=self.max_model_len,
            policy=config.scheduling_policy, long_prefill_token_threshold=config.long_prefill_token_threshold,
            kv_connector=kv_connector, draft_token_room=self._draft_token_room if config.speculative_config else None,
        )
        self.eos_token_ids = set(self.tokenizer.eos_token_ids) | set(self.model_config.eos_token_id)
        gen_eos = self.loaded.generation_config.get("eos_token_id")
        self.eos_token_ids |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        self.structured = StructuredOutputs(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids)
        self.speculator = None if spec is None else Speculator(spec, self._draft_engine(spec, draft_loaded))
        self.runner = ModelRunner(
            self.loaded.model, config, kv_spec=self.kv_spec, num_blocks=self.kv_plan.num_blocks,
            max_model_len=self.max_model_len, kv_dtype=kv_dtype, eos_token_ids=sorted(self.eos_token_ids),
            kv_groups=self.kv_plan,
            num_lookahead_tokens=0 if spec is None else spec.num_speculative_tokens,
            draft_method=spec.method if self._uses_draft_head(spec) else None,
            draft_head=head)
        kv_connector.bind(KVBlockIO(self.runner, self.kv_layout))
        self.kernels = kernel_choices(self.loaded, config.block_size, dtype, kv_dtype)
        for part, choice in self.kernels.items():
            logger.info("%s kernel: %s (%s)", part, choice.backend, choice.reason)
        if kv_scales is not None:
            self.runner.set_kv_scales(kv_scales)
        if config.poison_freed_blocks:
            self.kv_manager.block_pool.on_free = self.runner.poison_blocks
            for group, pool in enumerate(self.kv_manager.block_pools[1:], start=1):
                pool.on_free = functools.partial(self.runner.poison_blocks, group=group)
        self.states: dict[str, RequestState] = {}
        self.pending_forks: dict[str, list[Request]] = {}  # first child id -> its siblings
        self.children: dict[str, _Child] = {}
        self.in_flight: collections.deque[_InFlight] = collections.deque()
        self.metrics = EngineMetrics()
        self.stats = StepStats()
        self._aborted_outputs: list[RequestOutput] = []
        self._last_result_time = None
        if config.compile_at_startup:
            compiles, compile_seconds, start = backend_compile_count(), backend_compile_seconds(), time.perf_counter()
            self.runner.warmup()
            self.kv_connector.warmup()
            logger.info("warm-up compiled %d executables (%d step buckets) in %.1f s, %.1f s of it compiling",
                        backend_compile_count() - compiles, self.runner.num_buckets(), time.perf_counter() - start,
                        backend_compile_seconds() - compile_seconds)

    def _draft_token_room(self, num_tokens: int) -> int:
        """Drafts ride in the padding of the token bucket a step needs anyway: on a compute-bound
        device (a CPU) a step costs its bucket, so they cost no model time; a larger bucket
        costs more than rejected drafts give back (BENCHMARKS.md, speculative decoding). The
        1-token bucket (one stream's plain decode step) has no padding: a speculating row
        counts from the next bucket up, whose matrix products cost about the same on a CPU."""
        buckets = [b for b in self.config.token_bucket_sizes() if b > 1] or [num_tokens]
        return bucket_for(num_tokens, buckets) - num_tokens

    @staticmethod
    def _uses_draft_head(spec) -> bool:
        """Speculation by a draft head on device (jaxserve/spec_decode/draft_head.py)."""
        return spec is not None and spec.method in ("eagle3", "mtp")

    def _draft_head(self, spec, draft_loaded, dtype, window: int | None):
        """The EAGLE-3 head (method "eagle3"): `draft_loaded` when given (an `Eagle3Head`), else
        loaded from `spec.model` (attending over `window` keys: KV group 0's, whose blocks its cache
        shares); None for other methods ("mtp" uses the target's own layer)."""
        if spec is None or spec.method != "eagle3":
            return None
        if draft_loaded is not None:
            return draft_loaded
        from models.eagle3 import load_eagle3

        return load_eagle3(spec.model, self.model_config, dtype=dtype, attention_backend=self.config.attention_backend,
                           sliding_window=window)

    def _draft_engine(self, spec, draft_loaded: LoadedModel | None):
        """The draft model's engine (method "draft_model"): the target's limits, no speculation."""
        if spec.method != "draft_model":
            return None
        config = dataclasses.replace(self.config, model=spec.model, speculative_config=None,
                                     max_model_len=self.max_model_len, cpu_kv_cache_bytes=0)
        draft = EngineCore(config, loaded=draft_loaded)
        if draft.model_config.vocab_size != self.model_config.vocab_size:
            raise ValueError(f"speculative_config.model must share the target's tokenizer: vocab size "
                             f"{draft.model_config.vocab_size} against {self.model_config.vocab_size}")
        return draft

    # ---- requests in and out ----

    def add_request(self, request_id: str, prompt: Any, params: SamplingParams | None = None, *,
                    priority: int = 0, stream: bool = False, arrival_time: float | None = None) -> None:
        """Validate and enqueue; raises ValueError naming the bad field (nothing is enqueued)."""
        arrival_time = arrival_time or time.monotonic()
        processed, params, priority = self.check_request(request_id, prompt, params, priority)
        params = params.apply_generation_config(self.loaded.generation_config)
        state = RequestState(
            request_id, processed.text, processed.token_ids, params, tokenizer=self.tokenizer,
            eos_token_ids=self.eos_token_ids, max_model_len=self.max_model_len, stream=stream,
            stream_interval=self.config.stream_interval, arrival_time=arrival_time)
        self.states[request_id] = state
        max_tokens = self.max_model_len - len(processed.token_ids)
        if params.max_tokens is not None:
            max_tokens = min(max_tokens, params.max_tokens)
        for index in range(params.n):
            child_id = request_id if params.n == 1 else f"{request_id}#{index}"
            child_params = params
            if params.n > 1 and params.seed is not None:
                child_params = dataclasses.replace(params, seed=params.seed + index)
            request = Request(
                child_id, processed.token_ids, max_tokens=max_tokens, sampling_params=child_params,
                arrival_time=arrival_time, priority=priority, cache_salt=processed.cache_salt,
                skip_prefix_cache=params.prompt_logprobs is not None)
            self.children[child_id] = _Child(request_id, index, request, child_params)
            if params.structured_outputs is not None:
                self.structured.add(child_id, params.structured_outputs)
            if index == 0:
                self.scheduler.add_request(request)
            else:  # forked from the first child once its prompt is computed (shares its blocks)
                self.pending_forks.setdefault(f"{request_id}#0", []).append(request)
        self.metrics.on_arrival(len(processed.token_ids))

    def check_request(self, request_id: str, prompt: Any, params: SamplingParams | None, priority: int,
                      ids_in_use: Sequence[str] = ()) -> tuple[ProcessedPrompt, SamplingParams, int]:
        """The checks of `add_request` (ValueError naming the field); the prompt tokenized."""
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        if request_id in self.states or request_id in ids_in_use:
            raise ValueError(f"request_id {request_id!r} is already in use")
        return self.check_inputs(prompt, params, priority)

    def check_inputs(self, prompt: Any, params: SamplingParams | None, priority: int = 0
                     ) -> tuple[ProcessedPrompt, SamplingParams, int]:
        """The checks of a request that need no engine state (ValueError naming the field), and
        the prompt tokenized: safe on any thread, so that a front end can tokenize a long prompt
        away from the engine thread and its event loop (pass the ProcessedPrompt on)."""
        params = params if params is not None else SamplingParams()
        check_sampling_params(params, vocab_size=self.model_config.vocab_size, max_logprobs=self.config.max_logprobs,
                              max_n=self.config.max_n, max_logit_bias=self.config.max_logit_bias,
                              max_stop_token_ids=self.config.max_stop_token_ids)
        if params.structured_outputs is not None:
            self.structured.compile(params.structured_outputs)  # cached: add_request finds it
        priority = check_priority(priority)
        processed = process_prompt(prompt, self.tokenizer, vocab_size=self.model_config.vocab_size,
                                   max_model_len=self.max_model_len)
        return processed, params, priority

    def abort_request(self, request_ids: str | Sequence[str]) -> None:
        """Abort unfinished requests (unknown or finished ids are ignored); their final output,
        with finish_reason "abort", comes out of the next `step()`."""
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            state = self.states.get(request_id)
            if state is None:
                continue
            live = [c for c, child in self.children.items() if child.parent == request_id]
            self.pending_forks.pop(f"{request_id}#0", None)
            self._finish_children(live, RequestStatus.FINISHED_ABORTED)
            state.abort()
            output = state.make_output()
            if output is not None:
                self._aborted_outputs.append(output)
            self._retire(request_id, "abort")

    def has_unfinished_requests(self) -> bool:
        """Requests to serve, steps to finish, or finished requests whose device state the next
        step's scheduler output releases."""
        return bool(self.states) or bool(self.in_flight) or self.scheduler.has_finished_requests()

    def pause_request(self, request_id: str, paused: bool = True) -> None:
        """Stop (or resume) scheduling a request and its `n` completions: a front end whose
        consumer stopped reading pauses it, so that its answer is not generated into a growing
        buffer. It keeps its KV blocks (preemption may still take them, as for any request)
        and resumes where it stopped. Unknown or finished ids are ignored."""
        for child in self.children.values():
            if child.parent == request_id:
                child.request.paused = paused

    def is_paused(self) -> bool:
        """Every unfinished request is paused and nothing is in flight: a step would do nothing,
        so a serving loop may sleep until a command comes."""
        return (bool(self.children) and not self.in_flight and not self._aborted_outputs
                and all(child.request.paused for child in self.children.values()))

    # ---- the loop ----

    def step(self) -> list[RequestOutput]:
        """Schedule and dispatch one step; return outputs from the step before it."""
        drained = []
        if self.speculator is not None:  # drafts follow the accepted tokens: the step before goes first
            while self.in_flight:
                drained.extend(self._process(self.in_flight.popleft()))
        scheduled = self.scheduler.schedule()
        self.kv_connector.start_load_kv()  # blocks that arrived, written before this step reads them
        rows = self.runner.update_states(scheduled)
        if rows and self._mask_waits_for_in_flight(scheduled):
            for step in self.in_flight:  # the matchers must see those tokens before the masks are filled
                self._advance_matchers(step)
        if rows:
            self.in_flight.append(self._dispatch(scheduled, rows))
        outputs, self._aborted_outputs = self._aborted_outputs + drained, []
        # Keep one step on the device while the host works; with nothing new, drain.
        while len(self.in_flight) > (1 if scheduled.scheduled else 0):
            outputs.extend(self._process(self.in_flight.popleft()))
        self.metrics.num_preemptions = self.scheduler.num_preemptions
        return outputs

    def _mask_waits_for_in_flight(self, scheduled) -> bool:
        """A constrained row samples in `scheduled` while its previous token is still in flight."""
        constrained = [item.request_id for item in scheduled.scheduled
                       if item.samples and self.structured.is_constrained(item.request_id)]
        if not constrained or not self.in_flight:
            return False
        in_flight = {child_id for step in self.in_flight for child_id, did_sample in step.rows if did_sample}
        waits = any(child_id in in_flight for child_id in constrained)
        self.structured.num_waits += waits
        return waits

    def _advance_matchers(self, step: _InFlight) -> None:
        """Feed a step's tokens to its constrained completions' matchers (waits for the step)."""
        host = step.result.get()
        step.verdicts = {child_id: self.structured.advance(child_id, _row_tokens(host, row)[0])
                         for row, (child_id, did_sample) in enumerate(step.rows)
                         if did_sample and child_id in self.children and self.structured.is_constrained(child_id)}

    def _dispatch(self, scheduled, rows) -> _InFlight:
        row_info, params, prompt_rows = [], [], []
        token_row = 0
        had_prefill = False
        for item in scheduled.scheduled:
            child = self.children[item.request_id]
            request = child.request
            if not child.scheduled:
                child.scheduled = True
                self.metrics.on_first_scheduled(self.states[child.parent], request)
            row_info.append((item.request_id, item.samples))
            params.append(child.params)
            had_prefill |= (item.num_new_tokens - len(item.spec_token_ids) > 1
                            or item.num_computed_tokens < request.num_prompt_tokens)
            if child.params.prompt_logprobs is not None and item.num_computed_tokens < request.num_prompt_tokens:
                prompt_rows.append((item.request_id, token_row, item.num_computed_tokens, item.num_new_tokens))
            token_row += item.num_new_tokens
            if item.samples and item.request_id in self.pending_forks:
                for sibling in self.pending_forks.pop(item.request_id):
                    self.scheduler.fork_request(item.request_id, sibling)
        out_lens = [max(0, r.num_computed + r.num_new - r.num_drafts - r.prompt_len) for r in rows]
        tensors = self.runner.sampling_tensors(params, out_lens)
        self.structured.fill_bitmask(tensors.token_bitmask, [
            (row, item.request_id) for row, item in enumerate(scheduled.scheduled) if item.samples])
        result = self.runner.execute(StepPlan(rows, tensors, prompt_logprobs=bool(prompt_rows)))
        return _InFlight(scheduled, row_info, prompt_rows, result, tensors.num_logprobs, had_prefill)

    def _process(self, step: _InFlight) -> list[RequestOutput]:
        host = step.result.get()
        now = time.monotonic()
        if self._last_result_time is not None:
            self.stats.add(now - self._last_result_time, step.had_prefill)
        self._last_result_time = now
        touched: dict[str, None] = {}
        sampled: dict[str, list[int]] = {}
        for child_id, first_row, first_pos, num_new in step.prompt_rows:
            if child_id in self.children:
                self._add_prompt_logprobs(self.children[child_id], host, first_row, first_pos, num_new)
        for row, (child_id, did_sample) in enumerate(step.rows):
            child = self.children.get(child_id)
            if child is None:
                continue  # finished or aborted while this step ran
            if not did_sample:
                continue
            tokens = _row_tokens(host, row)
            token = tokens[0]  # a constrained row carries no drafts: its one token
            sampled[child_id] = tokens
            num_drafts = len(step.scheduled.scheduled[row].spec_token_ids)
            if num_drafts:
                self.metrics.on_verified(num_drafts, len(tokens) - 1)
            logprobs = None
            k = child.params.logprobs
            if k is not None:
                logprobs = [position_logprobs(self.tokenizer, t, *_token_logprobs(host, row, i), k)
                            for i, t in enumerate(tokens)]
            state = self.states[child.parent]
            touched[child.parent] = None
            verdict = (step.verdicts or {}).get(child_id) or self.structured.advance(child_id, token)
            if verdict == Verdict.REJECTED:  # the token breaks the grammar: dropped, the completion ends
                finished = state.stop(child.index)
            else:
                finished = state.add_tokens(child.index, tokens, logprobs)
                finished = finished or (verdict == Verdict.COMPLETE and state.stop(child.index))
            if finished:
                finish = state.trackers[child.index].finish
                self._finish_children([child_id], _FINISH_STATUS[finish.finish_reason])
        self.scheduler.update_from_output(step.scheduled, sampled)
        if self.speculator is not None:
            drafts = host.get("draft_token_ids")
            self.speculator.propose([(self.children[c].request, self.children[c].params)
                                     for c in sampled if c in self.children],
                                    None if drafts is None else {child_id: drafts[row] for row, (child_id, _)
                                                                 in enumerate(step.rows) if child_id in sampled})
        outputs = []
        for parent in touched:
            state = self.states[parent]
            output = state.make_output()
            if output is not None:
                outputs.append(output)
            if state.finished:
                self._retire(parent, state.trackers[0].finish.finish_reason)
        return outputs

    def _add_prompt_logprobs(self, child: _Child, host, first_row: int, first_pos: int, num_new: int) -> None:
        """Logprobs of prompt tokens first_pos+1 .. scored at positions first_pos .. (this chunk)."""
        state = self.states[child.parent]
        if child.index != 0 or state.prompt_logprobs is None:
            return
        last = min(first_pos + num_new, child.request.num_prompt_tokens - 1)
        state.add_prompt_logprobs([
            position_logprobs(
                self.tokenizer, host["prompt_token_ids"][row], host["prompt_token_logprob"][row],
                host["prompt_token_rank"][row], host["prompt_top_ids"][row], host["prompt_top_logprobs"][row],
                child.params.prompt_logprobs)
            for row in range(first_row, first_row + last - first_pos)
        ])

    def _finish_children(self, child_ids: list[str], status: RequestStatus) -> None:
        self.scheduler.finish_requests(child_ids, status)  # the next step's output frees their slots
        for child_id in child_ids:
            self.children.pop(child_id, None)
            self.structured.remove(child_id)

    def _retire(self, request_id: str, finish_reason: str) -> None:
        state = self.states.pop(request_id)
        self.metrics.on_finished(state, finish_reason)

    # ---- introspection ----

    def compile_count(self) -> int:
        return backend_compile_count()

    def num_running(self) -> int:
        return self.scheduler.num_running

    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    def kv_cache_usage(self) -> float:
        return self.kv_manager.usage

