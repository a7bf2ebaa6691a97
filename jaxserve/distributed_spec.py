"""Which process of a multi-host run this is, from engine options or the environment. Read
without importing jax: `jaxserve serve` decides whether to bind its ports (process 0 only) before
the heavy imports."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

from jaxserve.config import EngineConfig, check_distributed

ENV_VARS = {"coordinator_address": "JAXSERVE_COORDINATOR_ADDRESS", "num_processes": "JAXSERVE_NUM_PROCESSES",
            "process_id": "JAXSERVE_PROCESS_ID"}


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
    coordinator_address: str | None
    num_processes: int
    process_id: int

    @property
    def is_multihost(self) -> bool:
        return self.num_processes > 1

    @property
    def is_leader(self) -> bool:
        return self.process_id == 0


def resolve_spec(coordinator_address: str | None = None, num_processes: int | None = None,
                 process_id: int | None = None, environ: Mapping[str, str] | None = None) -> DistributedSpec:
    """Given values, else the environment's, else one process; errors name the field or variable."""
    environ = os.environ if environ is None else environ
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    names = {}
    for field, var in ENV_VARS.items():
        names[field] = field
        if given[field] is None and environ.get(var):
            names[field] = f"${var}"
            given[field] = environ[var]
            if field != "coordinator_address":
                try:
                    given[field] = int(given[field])
                except ValueError:
                    raise ValueError(f"${var} must be an integer, got {environ[var]!r}") from None
    check_distributed(given["coordinator_address"], given["num_processes"], given["process_id"],
                      names=tuple(names.values()))
    spec = DistributedSpec(given["coordinator_address"], given["num_processes"] or 1, given["process_id"] or 0)
    if spec.process_id >= spec.num_processes:
        raise ValueError(f"{names['process_id']} must be in [0, {spec.num_processes}) "
                         f"({names['num_processes']} {spec.num_processes}), got {spec.process_id}")
    if spec.is_multihost and spec.coordinator_address is None:
        raise ValueError(f"coordinator_address (or ${ENV_VARS['coordinator_address']}) is required with "
                         f"num_processes {spec.num_processes}")
    return spec


def spec_of(config: EngineConfig) -> DistributedSpec:
    return resolve_spec(config.coordinator_address, config.num_processes, config.process_id)


def is_follower(config: EngineConfig) -> bool:
    spec = spec_of(config)
    return spec.is_multihost and not spec.is_leader
