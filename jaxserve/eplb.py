"""Expert-parallel load balancing (EPLB): the placement policy and the runner's step hook.

Each step the forward writes every MoE layer's per-expert token counts on device (models/moe.py
`SparseMoEBlock.assign`); the step returns them and the hook adds them to a device-side sliding
window (no host sync per step). Every `interval` steps the hook reads the window once, computes
a new logical -> physical expert map per layer (`rebalance`: replicate the hottest experts into
the spare physical slots, then pack replicas onto ranks heaviest-first into the least-loaded
rank with room, as DeepSeek's EPLB does), moves the expert weights (and fp8 experts' block
scales) with one jitted gather per tensor (same shapes and shardings) and swaps the map arrays.
Maps are device-array inputs over a fixed slot count: no recompilation.

The runner (jaxserve/model_runner.py) holds one `EplbHook` (`eplb_hook`: None without
expert-parallel MoE blocks) and calls it at three points, as it calls the KV connector:
- `before_forward(model)`, inside the traced step: zero the loads the MoE blocks add to;
- `after_forward(model)`, inside the traced step: the step's loads [layers, E], a step output;
- `after_step(loads, params)`, on the host once the step is dispatched: record the loads, and
  every `interval` steps rebalance; returns the parameters the next step runs with.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.config import EngineConfig
from models.mesh import host_value, replicated
from models.moe import moe_blocks

logger = logging.getLogger("jaxserve.eplb")


def rebalance(load: np.ndarray, num_physical: int, ep_size: int, max_replicas: int) -> dict[str, np.ndarray]:
    """Expert loads [E] -> a placement over `num_physical` slots (`num_physical / ep_size` per
    rank): phys_to_logical [P] (-1: empty), replica_table [E, max_replicas], replica_count [E].

    Replicas go one at a time to the expert with the highest load per replica; every prefix of
    that sequence is packed (heaviest replica first into the least-loaded rank with a free slot,
    then swaps off the heaviest rank) and the most balanced packing wins, so spare slots stay
    empty when filling them would unbalance the ranks."""
    load = np.asarray(load, np.float64)
    num_experts = load.shape[0]
    if num_physical < num_experts or num_physical % ep_size:
        raise ValueError(f"num_physical ({num_physical}) must be >= num_experts ({num_experts}) and a multiple "
                         f"of ep_size ({ep_size})")
    if max_replicas < 1:
        raise ValueError(f"max_replicas must be >= 1, got {max_replicas}")
    per_rank = num_physical // ep_size
    count = np.ones(num_experts, np.int64)
    best = _pack(load, count, ep_size, per_rank)
    for _ in range(num_physical - num_experts):
        share = np.where(count < max_replicas, load / count, -1.0)
        hottest = int(np.argmax(share))
        if share[hottest] <= 0:
            break
        count[hottest] += 1
        packed = _pack(load, count, ep_size, per_rank)
        if packed[0] < best[0] - 1e-12:
            best = packed
    rank_items = best[1]
    phys_to_logical = np.full(num_physical, -1, np.int32)
    for rank, items in enumerate(rank_items):
        phys_to_logical[rank * per_rank: rank * per_rank + len(items)] = items
    table = np.zeros((num_experts, max_replicas), np.int32)
    replica_count = np.zeros(num_experts, np.int32)
    for slot, expert in enumerate(phys_to_logical):
        if expert >= 0:
            table[expert, replica_count[expert]] = slot
            replica_count[expert] += 1
    for e in range(num_experts):
        table[e, replica_count[e]:] = table[e, 0]
    return {"phys_to_logical": phys_to_logical, "replica_table": table, "replica_count": replica_count}


def _pack(load: np.ndarray, count: np.ndarray, ep_size: int, per_rank: int) -> tuple[float, list[list[int]]]:
    """Replicas (expert e's load split over count[e]) onto ranks -> (peak rank load, items)."""
    share = load / count
    replicas = sorted((e for e in range(load.shape[0]) for _ in range(count[e])), key=lambda e: -share[e])
    rank_load = np.zeros(ep_size)
    rank_items: list[list[int]] = [[] for _ in range(ep_size)]
    for expert in replicas:
        rank = min((r for r in range(ep_size) if len(rank_items[r]) < per_rank),
                   key=lambda r: (rank_load[r], len(rank_items[r])))
        rank_items[rank].append(expert)
        rank_load[rank] += share[expert]
    _refine(rank_items, rank_load, share)
    return float(rank_load.max()), rank_items


def _refine(rank_items: list[list[int]], rank_load: np.ndarray, share: np.ndarray, rounds: int = 64) -> None:
    """Swap replicas between the heaviest rank and another while that lowers the heaviest load
    (greedy packing with a fixed slot count per rank can leave two heavy replicas together)."""
    for _ in range(rounds):
        hi = int(np.argmax(rank_load))
        best = None
        for r in range(len(rank_items)):
            if r == hi:
                continue
            for i, a in enumerate(rank_items[hi]):
                for j, b in enumerate(rank_items[r]):
                    delta = share[a] - share[b]
                    if delta <= 0:
                        continue
                    peak = max(rank_load[hi] - delta, rank_load[r] + delta)
                    if peak < rank_load[hi] - 1e-12 and (best is None or peak < best[0]):
                        best = (peak, r, i, j, delta)
        if best is None:
            return
        _, r, i, j, delta = best
        rank_items[hi][i], rank_items[r][j] = rank_items[r][j], rank_items[hi][i]
        rank_load[hi] -= delta
        rank_load[r] += delta


def rank_loads(load: np.ndarray, phys_to_logical: np.ndarray, replica_count: np.ndarray, ep_size: int) -> np.ndarray:
    """Tokens each rank computes when every expert's load splits evenly over its replicas."""
    per_rank = phys_to_logical.shape[0] // ep_size
    slot_load = np.where(phys_to_logical >= 0,
                         np.asarray(load, np.float64)[np.maximum(phys_to_logical, 0)]
                         / replica_count[np.maximum(phys_to_logical, 0)], 0.0)
    return slot_load.reshape(ep_size, per_rank).sum(axis=1)


def balancedness(rank_load: np.ndarray) -> float:
    """Mean / max tokens per rank (1.0: perfectly balanced)."""
    peak = float(np.max(rank_load))
    return 1.0 if peak == 0 else float(np.mean(rank_load)) / peak


@jax.jit
def _add(total, loads):
    return total + loads


@jax.jit
def _push(window, loads, index):
    return window.at[index % window.shape[0]].set(loads)


def eplb_hook(graphdef, params, config: EngineConfig, mesh) -> EplbHook | None:
    """The runner's step hook for a model (graphdef, params) laid out on `mesh` (None: one device):
    None unless it has expert-parallel MoE blocks. Loads are collected on every such engine
    (per-rank token counts for benchmarks); it rebalances when `config.enable_eplb`."""
    if mesh is None:
        return None
    blocks = moe_blocks(nnx.merge(graphdef, params))
    if not blocks or blocks[0].ep is None:
        return None
    return EplbHook(graphdef, params, window=config.eplb_window_size, interval=config.eplb_step_interval,
                    sharding=replicated(mesh), enabled=config.enable_eplb)


class EplbHook:
    """Collects per-step expert loads on device and rebalances every `interval` steps (module
    docstring: the three calls the runner makes)."""

    def __init__(self, graphdef, params, *, window: int, interval: int, sharding, enabled: bool = True):
        """`enabled=False` only collects loads (per-rank token counts for benchmarks)."""
        self.graphdef = graphdef
        blocks = moe_blocks(nnx.merge(graphdef, params))
        self.blocks = len(blocks)
        layout = blocks[0].ep
        self.num_experts = blocks[0].config.num_experts
        self.num_physical = layout.num_physical
        self.ep_size = layout.ep_size
        self.max_replicas = layout.max_replicas
        self.interval = interval
        self.enabled = enabled
        self.window = jnp.zeros((window, self.blocks, self.num_experts), jnp.int32, device=sharding)
        # Loads since the map last changed (device), and per-rank tokens of earlier maps (host).
        self.since_change = jnp.zeros((self.blocks, self.num_experts), jnp.int32, device=sharding)
        self.rank_tokens = np.zeros(self.ep_size)
        self.steps = 0
        self.history: list[dict] = []  # one entry per rebalance: balancedness before / after
        self._moves: dict = {}  # sharding -> jitted gather that keeps it

    # ---- inside the traced step ----

    @staticmethod
    def before_forward(model) -> None:
        """Zero the per-expert loads the MoE blocks add to."""
        for block in moe_blocks(model):
            block.expert_load[...] = jnp.zeros_like(block.expert_load[...])

    @staticmethod
    def after_forward(model) -> jax.Array:
        """The per-expert loads the forward wrote, stacked [layers, E]."""
        return jnp.stack([block.expert_load[...] for block in moe_blocks(model)])

    # ---- on the host ----

    def after_step(self, loads, params):
        """Record a dispatched step's loads (device int32 [layers, E], not read on the host);
        every `interval` steps rebalance. -> the parameters the next step runs with."""
        self.record(loads)
        return self.rebalance_params(params) if self.due() else params

    def _move(self, weight, src):
        """weight[src] with weight's own sharding (so the step's executable is reused)."""
        fn = self._moves.get(weight.sharding)
        if fn is None:
            fn = self._moves[weight.sharding] = jax.jit(lambda w, s: w[s], donate_argnums=(0,),
                                                         out_shardings=weight.sharding)
        return fn(weight, src)

    def record(self, loads) -> None:
        """loads: device int32 [layers, E] from one step (not read on the host)."""
        self.window = _push(self.window, loads, jnp.asarray(self.steps, jnp.int32))
        self.since_change = _add(self.since_change, loads)
        self.steps += 1

    def _flush_rank_tokens(self, model) -> None:
        """Add the loads since the last map change to per-rank tokens under the current map."""
        load = host_value(self.since_change)
        for layer, block in enumerate(moe_blocks(model)):
            self.rank_tokens += rank_loads(load[layer], host_value(block.phys_to_logical[...]),
                                           host_value(block.replica_count[...]), self.ep_size)
        self.since_change = jnp.zeros_like(self.since_change)

    def rank_token_counts(self, params) -> np.ndarray:
        """(token, expert) assignments each ep rank computed so far, summed over MoE layers."""
        self._flush_rank_tokens(nnx.merge(self.graphdef, params))
        return self.rank_tokens.copy()

    def due(self) -> bool:
        return self.enabled and self.steps > 0 and self.steps % self.interval == 0

    def window_load(self) -> np.ndarray:
        return host_value(self.window).sum(axis=0)  # [layers, E]; the one host read per interval

    def rebalance_params(self, params):
        """New placement for every MoE layer from the window; weights moved in place. -> params."""
        load = self.window_load()
        model = nnx.merge(self.graphdef, params)
        self._flush_rank_tokens(model)
        before, after = [], []
        for layer, block in enumerate(moe_blocks(model)):
            old_p2l = host_value(block.phys_to_logical[...])
            old_table = host_value(block.replica_table[...])
            before.append(balancedness(rank_loads(load[layer], old_p2l, host_value(block.replica_count[...]), self.ep_size)))
            new = rebalance(load[layer], self.num_physical, self.ep_size, self.max_replicas)
            after.append(balancedness(rank_loads(load[layer], new["phys_to_logical"], new["replica_count"], self.ep_size)))
            src = np.where(new["phys_to_logical"] >= 0, old_table[np.maximum(new["phys_to_logical"], 0), 0], 0)
            src = jnp.asarray(src.astype(np.int32))
            for param in block.experts.slot_params():  # weights, and fp8 experts' block scales
                param.set_value(self._move(param[...], src))
            for key in ("phys_to_logical", "replica_table", "replica_count"):
                old = getattr(block, key)[...]
                getattr(block, key).set_value(jax.device_put(new[key], old.sharding))
        entry = {"step": self.steps, "before": float(np.mean(before)), "after": float(np.mean(after))}
        self.history.append(entry)
        logger.info("EPLB rebalance at step %d: balancedness %.3f -> %.3f (mean over %d MoE layers)",
                    self.steps, entry["before"], entry["after"], self.blocks)
        return nnx.split(model)[1]
