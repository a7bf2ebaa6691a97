"""Engine options (`LLM(...)` keyword arguments and `jaxserve serve` flags), validated up front.

`EngineConfig` holds one group per concern, each a dataclass that checks its own fields:

| group | class | options |
|---|---|---|
| `load` | `LoadConfig` | model, dtype, attention_backend, use_weight_cache, fp8_weights |
| `cache` | `CacheConfig` | block_size, max_model_len, kv_cache_dtype, kv_cache_memory_bytes, gpu_memory_utilization, enable_prefix_caching, cpu_kv_cache_bytes, disable_hybrid_kv_cache_manager |
| `scheduler` | `SchedulerConfig` | max_num_seqs, max_num_batched_tokens, max_num_reqs, scheduling_policy, long_prefill_token_threshold, stream_interval, token_buckets, request_buckets |
| `parallel` | `ParallelConfig` | tensor/expert/data_parallel_size, enable_eplb, num_redundant_experts, eplb_window_size, eplb_step_interval, expert_dispatch, expert_capacity_factor, enable_dbo, dbo_min_tokens, coordinator_address, num_processes, process_id |
| `compilation` | `CompilationConfig` | compile_at_startup, compilation_cache_dir, compilation_cache_max_bytes |
| `sampling` | `SamplingConfig` | seed, max_logprobs, max_logit_bias, max_stop_token_ids, max_n |
| `debug` | `DebugConfig` | poison_freed_blocks |
| `speculative` | `SpeculativeOptions` | speculative_config |

Every option keeps its flat name (vLLM's): `EngineConfig(block_size=32)`, `LLM(block_size=32)`,
`--block-size 32`, and `config.block_size` reads `config.cache.block_size`.

Importing this module imports no jax: the choice lists come from jax-free leaves of the layers
that own them (`pallas_kernels.backends`, `models.expert_dispatch`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from models.config import FP8_WEIGHTS
from models.expert_dispatch import STRATEGIES as EXPERT_DISPATCH
from jaxserve.spec_decode.config import SpeculativeConfig
from pallas_kernels.backends import BACKENDS as ATTENTION_BACKENDS

KV_CACHE_DTYPES = ("auto", "fp8")
SCHEDULING_POLICIES = ("fcfs", "priority")  # jaxserve/scheduler.py implements them
DTYPES = ("auto", "float32", "bfloat16", "float16")
# Block-FP8 checkpoints (models/quantization.py): "auto" keeps fp8 weights on GPU, dequantizes elsewhere.

# CPU has no device memory to measure: unless told otherwise, the KV cache gets this much.
DEFAULT_CPU_KV_CACHE_BYTES = 2 << 30


@dataclasses.dataclass
class LoadConfig:
    """The model, and how it is loaded and run."""

    model: str = "smollm2-135m-instruct"  # alias, HF folder, checkpoint folder or .gguf path
    dtype: str = "auto"  # bfloat16 on GPU/TPU and bf16-capable CPUs, else float32 (jaxserve/cpu_dtype.py)
    attention_backend: str = "auto"
    use_weight_cache: bool = True
    # A block-FP8 checkpoint's weights (DeepSeek-V3, Qwen3-FP8): "keep" stores them as fp8 with
    # block scales (about 1 byte per weight), "dequantize" converts them at load to `dtype`;
    # "auto": keep on GPU, dequantize elsewhere. Other checkpoints ignore it.
    fp8_weights: str = "auto"

    def __post_init__(self) -> None:
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        _check_choice("fp8_weights", self.fp8_weights, FP8_WEIGHTS)


@dataclasses.dataclass
class CacheConfig:
    """The paged KV cache: its blocks, its budget, prefix caching and the host tier."""

    block_size: int = 16
    max_model_len: int | str | None = None  # None: the model's native length, capped by KV; "auto": fit
    kv_cache_dtype: str = "auto"
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    # Host-memory KV tier: evicted prefix blocks are kept in this much host RAM (0: off).
    cpu_kv_cache_bytes: int = 0
    # vLLM's name: sliding-window layers keep every block, as full-attention layers do, instead
    # of a KV group of their own that gives back what the window left (jaxserve/kv/cache_manager.py).
    disable_hybrid_kv_cache_manager: bool = False

    def __post_init__(self) -> None:
        _check_choice("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        _check_positive(self, "block_size")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if isinstance(self.max_model_len, str) and self.max_model_len != "auto":
            raise ValueError(f"max_model_len must be an integer >= 1 or 'auto', got {self.max_model_len!r}")
        if isinstance(self.max_model_len, int) and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError(f"kv_cache_memory_bytes must be > 0, got {self.kv_cache_memory_bytes}")
        if not isinstance(self.cpu_kv_cache_bytes, int) or self.cpu_kv_cache_bytes < 0:
            raise ValueError(f"cpu_kv_cache_bytes must be an integer >= 0, got {self.cpu_kv_cache_bytes!r}")


@dataclasses.dataclass
class SchedulerConfig:
    """What one step may hold, the queue's order, and the padding buckets its shapes come from."""

    # Per step: requests running at once, and tokens computed. With data_parallel_size > 1 both
    # are per dp shard (each shard schedules its own slice of the batch, as a vLLM DP rank or an
    # SGLang DP-attention rank does): the engine runs up to dp x these.
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    # Request-state slots on device (token history, block tables); >= max_num_seqs x
    # data_parallel_size (all that can run at once), so preempted requests keep their slot and
    # their history. None: 4 x that (EngineConfig derives it).
    max_num_reqs: int | None = None
    scheduling_policy: str = "fcfs"
    long_prefill_token_threshold: int = 0
    stream_interval: int = 1
    # Padding buckets; None derives powers of two from the limits above, after a bucket of 1: one
    # stream decodes 1 token of 1 row (not 16 tokens of 8 rows), 1.5-2.1x faster per output token
    # on the 2-core CPU (tools/decode_buckets_ab.py), for 7 more buckets to compile at start-up.
    token_buckets: tuple[int, ...] | None = None
    request_buckets: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        _check_choice("scheduling_policy", self.scheduling_policy, SCHEDULING_POLICIES)
        for name in ("max_num_seqs", "max_num_batched_tokens", "stream_interval"):
            _check_positive(self, name)

    def token_bucket_sizes(self) -> tuple[int, ...]:
        if self.token_buckets:
            return tuple(sorted(set(self.token_buckets) | {self.max_num_batched_tokens}))
        return _with_one(_powers_of_two(16, self.max_num_batched_tokens))

    def request_bucket_sizes(self) -> tuple[int, ...]:
        if self.request_buckets:
            return tuple(sorted(set(self.request_buckets) | {self.max_num_seqs}))
        return _with_one(_powers_of_two(8, self.max_num_seqs, factor=4))


@dataclasses.dataclass
class ParallelConfig:
    """The device mesh and what runs over it: tensor, expert and data parallelism, expert load
    balancing, dual-batch overlap, and the processes of a multi-host engine."""

    tensor_parallel_size: int = 1
    expert_parallel_size: int = 1
    data_parallel_size: int = 1
    enable_eplb: bool = False
    # Expert parallelism (models/expert_parallel.py): dispatch strategy, all_to_all capacity
    # (0: worst case; otherwise exact extra rounds on overflow), EPLB replicas and cadence.
    expert_dispatch: str = "allgather"
    expert_capacity_factor: float = 0.0
    num_redundant_experts: int = 0
    eplb_window_size: int = 16
    eplb_step_interval: int = 32
    # Dual-batch overlap: run a step's decoder layers as two microbatches (attention and MoE)
    # from this many tokens per dp shard, the step's bucket (models/dbo.py; vLLM's decode
    # threshold is 32 tokens per DP rank).
    enable_dbo: bool = False
    dbo_min_tokens: int = 32
    # Multi-host (jaxserve/distributed.py): one engine over a mesh spanning processes. None reads
    # $JAXSERVE_COORDINATOR_ADDRESS / $JAXSERVE_NUM_PROCESSES / $JAXSERVE_PROCESS_ID (else 1 process).
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "expert_parallel_size", "data_parallel_size"):
            _check_positive(self, name)
        _check_choice("expert_dispatch", self.expert_dispatch, EXPERT_DISPATCH)
        if self.expert_capacity_factor < 0:
            raise ValueError(f"expert_capacity_factor must be >= 0 (0: worst case), got {self.expert_capacity_factor}")
        if not isinstance(self.num_redundant_experts, int) or self.num_redundant_experts < 0:
            raise ValueError(f"num_redundant_experts must be an integer >= 0, got {self.num_redundant_experts!r}")
        for name in ("eplb_window_size", "eplb_step_interval", "dbo_min_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        check_distributed(self.coordinator_address, self.num_processes, self.process_id)
        if self.enable_dbo and self.expert_parallel_size * self.data_parallel_size == 1:
            raise ValueError("enable_dbo needs expert_parallel_size * data_parallel_size > 1 "
                             "(it overlaps the expert-parallel collectives)")

    @property
    def uses_mesh(self) -> bool:
        """Whether the engine runs over a device mesh."""
        return self.tensor_parallel_size * self.expert_parallel_size * self.data_parallel_size > 1 or self.enable_eplb

    def __bool__(self) -> bool:
        # `config.parallel` was this flag before the options were grouped: read it by its name.
        raise TypeError("ParallelConfig has no truth value: whether the engine runs over a device mesh "
                        "is config.parallel.uses_mesh")


@dataclasses.dataclass
class CompilationConfig:
    """Compiling the step buckets, and jax's persistent compilation cache."""

    compile_at_startup: bool = True
    # jax's persistent compilation cache: "auto" is <cache dir>/xla ($JAXSERVE_CACHE_DIR, else
    # ~/.cache/jaxserve); None or "" turns it off.
    compilation_cache_dir: str | None = "auto"
    # Its size cap (jax's LRU eviction: least recently used entries are deleted first when a new
    # one would pass it); None or 0: no cap. Applies to the folder this setting chose.
    compilation_cache_max_bytes: int | None = 2 * 2**30

    def __post_init__(self) -> None:
        cap = self.compilation_cache_max_bytes
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 0):
            raise ValueError(f"compilation_cache_max_bytes must be an integer >= 0 (0: no cap), got {cap!r}")


@dataclasses.dataclass
class SamplingConfig:
    """The engine's sampling seed, and the limits on what a request's `SamplingParams` may ask."""

    seed: int = 0
    max_logprobs: int = 20
    # Entries a request's logit_bias, and ids its stop_token_ids, may hold. With max_logprobs they
    # fix the widths of the sampler's tables: no request's options change a compiled shape.
    max_logit_bias: int = 300
    max_stop_token_ids: int = 64
    # Completions per request (`n`) at most; None: max_num_seqs (all of them can run at once;
    # EngineConfig derives it). An unbounded n let one request take the engine for minutes or
    # exhaust the server's memory.
    max_n: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_logprobs", "max_logit_bias", "max_stop_token_ids"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.max_n is not None:
            _check_max_n(self.max_n)


@dataclasses.dataclass
class DebugConfig:
    """Checks that cost time, for finding bugs."""

    # Fill freed KV blocks with NaN so a read through a stale table shows up.
    poison_freed_blocks: bool = False


@dataclasses.dataclass
class SpeculativeOptions:
    """Speculative decoding: vLLM's `speculative_config` (jaxserve/spec_decode/config.py)."""

    # A dict, its JSON text (`--speculative-config '{"method": "ngram", ...}'`) or a
    # `SpeculativeConfig`; held parsed. None: off.
    speculative_config: Any = None

    def __post_init__(self) -> None:
        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)


# Group attribute -> its class, in the order flags and errors list them.
GROUPS: dict[str, type] = {"load": LoadConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
                           "parallel": ParallelConfig, "compilation": CompilationConfig,
                           "sampling": SamplingConfig, "debug": DebugConfig, "speculative": SpeculativeOptions}
# Every option's flat name -> the group holding it.
GROUP_OF: dict[str, str] = {field.name: group for group, cls in GROUPS.items() for field in dataclasses.fields(cls)}


@dataclasses.dataclass(init=False)
class EngineConfig:
    """Every option has vLLM's name. Sizes left as None are derived at start-up.

    Built from options by their flat names (`EngineConfig(block_size=32, max_num_seqs=8)`) and/or
    whole groups (`EngineConfig(cache=CacheConfig(block_size=32))`); a flat name given with its
    group overrides the group's value (so `dataclasses.replace(config, block_size=32)` works).
    Every option reads by its flat name too: `config.block_size` is `config.cache.block_size`."""

    load: LoadConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    parallel: ParallelConfig
    compilation: CompilationConfig
    sampling: SamplingConfig
    debug: DebugConfig
    speculative: SpeculativeOptions

    def __init__(self, **options: Any) -> None:
        for name in options:
            if name not in GROUPS and name not in GROUP_OF:
                raise TypeError(f"EngineConfig.__init__() got an unexpected keyword argument {name!r}")
        for group, cls in GROUPS.items():
            given = {name: value for name, value in options.items() if GROUP_OF.get(name) == group}
            base = options.get(group)
            # A fresh group either way: configs never share a mutable group.
            setattr(self, group, cls(**given) if base is None else dataclasses.replace(base, **given))
        self._check_across_groups()

    def _check_across_groups(self) -> None:
        """Defaults and limits that tie groups together."""
        if self.sampling.max_n is None:
            self.sampling.max_n = self.scheduler.max_num_seqs
            _check_max_n(self.sampling.max_n)
        max_running = self.scheduler.max_num_seqs * self.parallel.data_parallel_size  # max_num_seqs is per dp shard
        if self.scheduler.max_num_reqs is None:
            self.scheduler.max_num_reqs = 4 * max_running
        if self.scheduler.max_num_reqs < max_running:
            raise ValueError(f"max_num_reqs must be >= max_num_seqs x data_parallel_size ({max_running}), "
                             f"got {self.scheduler.max_num_reqs}")
        spec = self.speculative.speculative_config
        if spec is not None and self.parallel.data_parallel_size > 1:
            raise ValueError("speculative_config needs data_parallel_size == 1, "
                             f"got {self.parallel.data_parallel_size}")
        if spec is not None and self.scheduler.max_num_batched_tokens < 1 + spec.num_speculative_tokens:
            raise ValueError(f"max_num_batched_tokens must be >= 1 + speculative_config.num_speculative_tokens "
                             f"({1 + spec.num_speculative_tokens}), got {self.scheduler.max_num_batched_tokens}")

    def token_bucket_sizes(self) -> tuple[int, ...]:
        return self.scheduler.token_bucket_sizes()

    def request_bucket_sizes(self) -> tuple[int, ...]:
        return self.scheduler.request_bucket_sizes()


def _flat_option(group: str, name: str) -> property:
    def read(config: EngineConfig):
        return getattr(getattr(config, group), name)

    def write(config: EngineConfig, value) -> None:
        setattr(getattr(config, group), name, value)

    return property(read, write, doc=f"`{group}.{name}`")


for _name, _group in GROUP_OF.items():
    setattr(EngineConfig, _name, _flat_option(_group, _name))
del _name, _group


def _powers_of_two(low: int, high: int, factor: int = 2) -> tuple[int, ...]:
    sizes, size = [], min(low, high)
    while size < high:
        sizes.append(size)
        size *= factor
    return tuple(sizes + [high])


def _with_one(sizes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(sorted({1, *sizes}))


def bucket_for(value: int, buckets: tuple[int, ...]) -> int:
    """Smallest bucket >= value (buckets sorted ascending)."""
    for size in buckets:
        if size >= value:
            return size
    raise ValueError(f"{value} exceeds the largest bucket {buckets[-1]}")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def check_distributed(coordinator_address, num_processes, process_id, names=None) -> None:
    """Multi-host options (None: unset); `names` overrides the field names in errors."""
    names = names or ("coordinator_address", "num_processes", "process_id")
    if num_processes is not None and (isinstance(num_processes, bool) or not isinstance(num_processes, int)
                                      or num_processes < 1):
        raise ValueError(f"{names[1]} must be an integer >= 1, got {num_processes!r}")
    if process_id is not None:
        allowed = f"in [0, {num_processes}) (num_processes {num_processes})" if num_processes is not None else ">= 0"
        if (isinstance(process_id, bool) or not isinstance(process_id, int) or process_id < 0
                or (num_processes is not None and process_id >= num_processes)):
            raise ValueError(f"{names[2]} must be an integer {allowed}, got {process_id!r}")
    if coordinator_address is not None:
        host, _, port = str(coordinator_address).rpartition(":")
        if not isinstance(coordinator_address, str) or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{names[0]} must be 'host:port' with a port in [1, 65535], got {coordinator_address!r}")


def _check_positive(group, name: str) -> None:
    value = getattr(group, name)
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_max_n(max_n) -> None:
    if isinstance(max_n, bool) or not isinstance(max_n, int) or max_n < 1:
        raise ValueError(f"max_n must be an integer >= 1, got {max_n!r}")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


__all__ = ["EngineConfig", "LoadConfig", "CacheConfig", "SchedulerConfig", "ParallelConfig", "CompilationConfig",
           "SamplingConfig", "DebugConfig", "SpeculativeOptions", "bucket_for", "cdiv"]
