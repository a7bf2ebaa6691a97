"""Multi-host start-up: `jax.distributed` from engine options or the environment, and the engine
each process runs (the leader's `LeaderEngine`, a `FollowerEngine` elsewhere; jaxserve/multihost.py).

Every process starts the same way (same model, same options, its own `process_id`); together
their devices form the global mesh (`data_parallel_size * expert_parallel_size *
tensor_parallel_size` must equal the devices of all processes). Options left unset are read from
$JAXSERVE_COORDINATOR_ADDRESS, $JAXSERVE_NUM_PROCESSES and $JAXSERVE_PROCESS_ID.
"""

from __future__ import annotations

import atexit
import logging
from collections.abc import Callable

import jax

from jaxserve.config import EngineConfig
from jaxserve.distributed_spec import ENV_VARS, DistributedSpec, is_follower, resolve_spec, spec_of  # noqa: F401
from jaxserve.engine import EngineCore
from jaxserve.event_log import EventLog, claim_engine_number
from jaxserve.multihost import FollowerEngine, LeaderEngine
from jaxserve.outputs import RequestOutput
from models.loader import LoadedModel

logger = logging.getLogger("jaxserve.distributed")
# jax releases whose multi-process CPU collectives hang in the engine's step (pyproject excludes them).
CPU_COLLECTIVES_HANG = ("0.12.1",)


def init_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> DistributedSpec:
    """`jax.distributed.initialize` for more than one process (before any other jax call);
    a no-op for one process or when this process already joined the same cluster."""
    spec = resolve_spec(coordinator_address, num_processes, process_id)
    if not spec.is_multihost:
        return spec
    state = _global_state()
    if state.client is not None:
        if (state.num_processes, state.process_id) != (spec.num_processes, spec.process_id):
            raise ValueError(f"this process already joined a cluster as process {state.process_id} of "
                             f"{state.num_processes}, not {spec.process_id} of {spec.num_processes}")
        return spec
    # CPU devices talk through gloo (the default on newer jax); GPU and TPU use their own.
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(spec.coordinator_address, spec.num_processes, spec.process_id)
    if jax.__version__ in CPU_COLLECTIVES_HANG and jax.default_backend() == "cpu":
        logger.warning("jax %s: CPU devices of several processes deadlock in the engine's first step (gloo "
                       "all-reduce; jax 0.12.0 runs the same programs): use another jax version", jax.__version__)
    logger.info("process %d of %d joined %s; %d devices in all", spec.process_id, spec.num_processes,
                spec.coordinator_address, jax.device_count())
    return spec


def build_engine(config: EngineConfig, loaded: LoadedModel | None = None) -> EngineCore | LeaderEngine:
    """The engine a front end (LLM, AsyncLLM, the server) drives: `EngineCore` on one process,
    `LeaderEngine` on process 0 of several (shut down at exit, which stops the followers).
    Other processes run `run_follower` instead."""
    spec = spec_of(config)
    if not spec.is_multihost:
        return EngineCore(config, loaded=loaded)
    if not spec.is_leader:
        raise ValueError(f"process_id {spec.process_id} follows process 0: run jaxserve.distributed.run_follower "
                         f"(the jaxserve CLI does) instead of a front end")
    core, log = _core_and_log(config, loaded)
    engine = LeaderEngine(core, log)
    atexit.register(engine.shutdown)
    return engine


def build_follower(config: EngineConfig, loaded: LoadedModel | None = None,
                   on_output: Callable[[RequestOutput], None] | None = None) -> FollowerEngine:
    spec = spec_of(config)
    if not spec.is_multihost or spec.is_leader:
        raise ValueError(f"process_id {spec.process_id} of num_processes {spec.num_processes} is not a follower")
    return FollowerEngine(*_core_and_log(config, loaded), on_output=on_output)


def run_follower(config: EngineConfig, loaded: LoadedModel | None = None,
                 on_output: Callable[[RequestOutput], None] | None = None) -> FollowerEngine:
    """Build this process's engine and follow the leader until it shuts down."""
    follower = build_follower(config, loaded, on_output)
    follower.run()
    return follower


def _core_and_log(config: EngineConfig, loaded: LoadedModel | None) -> tuple[EngineCore, EventLog]:
    spec = init_distributed(config.coordinator_address, config.num_processes, config.process_id)
    need = config.data_parallel_size * config.expert_parallel_size * config.tensor_parallel_size
    if need != jax.device_count():
        raise ValueError(
            f"data_parallel_size * expert_parallel_size * tensor_parallel_size must equal the {jax.device_count()} "
            f"devices of the {spec.num_processes} processes (num_processes {spec.num_processes}), got {need}")
    # Every process loads the weights itself: from a checkpoint folder or the weight cache each
    # restores its own copy; a conversion is not cached (models/loader.py says why).
    core = EngineCore(config, loaded=loaded)
    store = _global_state().client
    # Each engine gets its own log: the n-th engine of every process reads and writes the same keys.
    return core, EventLog(store, f"jaxserve/engine{claim_engine_number(store, spec.process_id)}/events")


def _global_state():
    # jax's runtime client (key-value store) has no public accessor; this one exists on 0.11 and 0.12.
    from jax._src import distributed

    return distributed.global_state
