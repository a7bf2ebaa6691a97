"""`EngineConfig`: grouped options that keep their flat names, each group checking its own fields,
and one home for each list of choices."""

from __future__ import annotations

import dataclasses
import pickle
import subprocess
import sys

import pytest

from jaxserve.config import (
    GROUP_OF,
    GROUPS,
    CacheConfig,
    EngineConfig,
    ParallelConfig,
    SchedulerConfig,
)


def test_flat_options_reach_their_groups_and_read_back_flat():
    config = EngineConfig(model="tiny", block_size=32, max_num_seqs=8, tensor_parallel_size=2, max_logprobs=5,
                          poison_freed_blocks=True, compile_at_startup=False)
    assert (config.cache.block_size, config.scheduler.max_num_seqs, config.parallel.tensor_parallel_size,
            config.sampling.max_logprobs, config.debug.poison_freed_blocks, config.compilation.compile_at_startup,
            config.load.model) == (32, 8, 2, 5, True, False, "tiny")
    for name, group in GROUP_OF.items():
        assert getattr(config, name) == getattr(getattr(config, group), name), name
    assert config.token_bucket_sizes() == config.scheduler.token_bucket_sizes()


def test_derived_buckets_start_at_one_for_single_stream_decode():
    config = EngineConfig(model="tiny", max_num_seqs=64, max_num_batched_tokens=512)
    assert config.token_bucket_sizes() == (1, 16, 32, 64, 128, 256, 512)
    assert config.request_bucket_sizes() == (1, 8, 32, 64)
    small = EngineConfig(model="tiny", max_num_seqs=1, max_num_batched_tokens=8)
    assert (small.token_bucket_sizes(), small.request_bucket_sizes()) == ((1, 8), (1,))
    explicit = EngineConfig(model="tiny", token_buckets=(16,), request_buckets=(4,), max_num_seqs=8,
                            max_num_batched_tokens=64)
    assert (explicit.token_bucket_sizes(), explicit.request_bucket_sizes()) == ((16, 64), (4, 8))


def test_every_option_is_in_exactly_one_group():
    names = [field.name for cls in GROUPS.values() for field in dataclasses.fields(cls)]
    assert len(names) == len(set(names)) == len(GROUP_OF) == 45
    assert not set(GROUPS) & set(names)  # a group's name is never an option's


def test_groups_and_flat_names_together():
    config = EngineConfig(cache=CacheConfig(block_size=8, enable_prefix_caching=False), block_size=4)
    assert (config.block_size, config.enable_prefix_caching) == (4, False)  # the flat name wins
    changed = dataclasses.replace(config, block_size=64, max_num_seqs=4)
    assert (changed.block_size, changed.enable_prefix_caching, changed.max_num_seqs) == (64, False, 4)
    assert config.block_size == 4 and changed.cache is not config.cache  # groups are never shared
    assert dataclasses.asdict(config)["cache"]["block_size"] == 4
    assert pickle.loads(pickle.dumps(config)) == config
    with pytest.raises(TypeError, match="unexpected keyword argument 'block_sise'"):
        EngineConfig(block_sise=16)


@pytest.mark.parametrize("options, group, message", [
    (dict(dtype="int8"), "load", "dtype must be one of 'auto', 'float32'"),
    (dict(attention_backend="cuda"), "load", "attention_backend must be one of 'auto', 'reference'"),
    (dict(block_size=24), "cache", "block_size must be a power of two, got 24"),
    (dict(block_size=0), "cache", "block_size must be an integer >= 1, got 0"),
    (dict(max_model_len="long"), "cache", "max_model_len must be an integer >= 1 or 'auto'"),
    (dict(kv_cache_dtype="int4"), "cache", "kv_cache_dtype must be one of 'auto', 'fp8'"),
    (dict(gpu_memory_utilization=1.5), "cache", r"gpu_memory_utilization must be in \(0, 1\]"),
    (dict(cpu_kv_cache_bytes=-1), "cache", "cpu_kv_cache_bytes must be an integer >= 0"),
    (dict(max_num_seqs=0), "scheduler", "max_num_seqs must be an integer >= 1, got 0"),
    (dict(scheduling_policy="lifo"), "scheduler", "scheduling_policy must be one of 'fcfs', 'priority'"),
    (dict(stream_interval=0), "scheduler", "stream_interval must be an integer >= 1"),
    (dict(data_parallel_size=0), "parallel", "data_parallel_size must be an integer >= 1"),
    (dict(expert_dispatch="ring"), "parallel", "expert_dispatch must be one of 'allgather', 'all_to_all'"),
    (dict(enable_dbo=True), "parallel", r"enable_dbo needs expert_parallel_size \* data_parallel_size > 1"),
    (dict(num_processes=0), "parallel", "num_processes must be an integer >= 1"),
    (dict(compilation_cache_max_bytes=-1), "compilation", "compilation_cache_max_bytes must be an integer >= 0"),
    (dict(max_logit_bias=-1), "sampling", "max_logit_bias must be an integer >= 0"),
    (dict(max_n=0), "sampling", "max_n must be an integer >= 1"),
])
def test_each_group_checks_its_own_options(options, group, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**options)
    with pytest.raises(ValueError, match=message):
        GROUPS[group](**options)


def test_checks_across_groups():
    assert EngineConfig(max_num_seqs=16).max_n == 16  # max_n defaults to max_num_seqs
    assert EngineConfig(max_num_seqs=8, data_parallel_size=2).max_num_reqs == 64
    assert SchedulerConfig(max_num_seqs=8).max_num_reqs is None  # derived by EngineConfig, which knows dp
    with pytest.raises(ValueError, match=r"max_num_reqs must be >= max_num_seqs x data_parallel_size \(16\)"):
        EngineConfig(max_num_seqs=8, data_parallel_size=2, max_num_reqs=12)


def test_whether_the_engine_uses_a_mesh_is_read_by_name():
    assert not EngineConfig().parallel.uses_mesh
    assert EngineConfig(tensor_parallel_size=2).parallel.uses_mesh and ParallelConfig(enable_eplb=True).uses_mesh
    with pytest.raises(TypeError, match="config.parallel.uses_mesh"):  # `if config.parallel:` was that flag
        bool(EngineConfig().parallel)


def test_each_choice_list_has_one_home():
    from jaxserve import config, scheduler
    from models import config as model_config, expert_dispatch, quantization
    from pallas_kernels import backends, dispatch
    from server import main

    assert config.ATTENTION_BACKENDS is backends.BACKENDS is dispatch.BACKENDS
    assert config.EXPERT_DISPATCH is expert_dispatch.STRATEGIES
    assert scheduler.POLICIES is config.SCHEDULING_POLICIES
    assert config.FP8_WEIGHTS is quantization.FP8_WEIGHTS is model_config.FP8_WEIGHTS is main.FP8_WEIGHTS


def test_importing_the_config_imports_no_jax():
    code = ("import sys, jaxserve, jaxserve.config, jaxserve.engine_flags; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax', 'numpy')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout.strip() == "[]"
