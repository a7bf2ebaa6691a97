"""The runner's side of the scheduler's output: request slots, staged diffs, one step's rows.

Per-request state lives on device in rows indexed by a request's *slot* (vLLM's Model Runner V2,
tpu-inference's persistent batch): the token history and the block table (jaxserve/model_runner.py).
`InputBatch.update` consumes what the scheduler says changed (jaxserve/scheduler.py
`SchedulerOutput`) and nothing else: a finished request's slot is freed; a new request takes a
slot and stages its tokens and whole block table; a resumed one (preempted by recompute, slot
and history kept) stages its whole new table; a running one stages the blocks appended this step.
The runner uploads the staged writes before the step, in chunks.

KV groups (sliding-window layers, jaxserve/kv/cache_manager.py): each group has its own table
per slot, row `group * num_slots + slot` of the device tables. A sliding group's table is a run of
null blocks (the blocks its window gave back) followed by live ones; the columns that turned null
since the last upload are written as the null block 0, so the device tables never name a block
the request no longer holds.

A step's rows are shard-major over the dp shards (data-parallel attention, models/dp_attention.py):
shard s owns rows [s * R, (s + 1) * R) and tokens [s * T, (s + 1) * T), every shard padded to the
same buckets; one shard (dp = 1) is the plain case of the same layout.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from jaxserve.scheduler import SchedulerOutput


@dataclasses.dataclass
class RowPlan:
    """One scheduled request in a step."""

    slot: int
    num_computed: int  # tokens already in the KV cache
    num_new: int  # tokens computed this step
    sample: bool  # the chunk reaches the last known token: sample the next one
    shard: int = 0  # dp shard holding the request's KV blocks (block ids local to it)
    prompt_len: int = 0  # the request's prompt length (output length = num_computed + num_new - prompt_len)
    num_drafts: int = 0  # speculative decoding: the row's last tokens are drafts to verify


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepInputs:
    """A step's rows, shard-major: rows [dp * R], token offsets local to each shard."""

    slots: jax.Array  # [dp * R] request slot of each row
    num_computed: jax.Array  # [dp * R]
    query_start_loc: jax.Array  # [dp, R + 1]
    num_seqs: jax.Array  # [dp] real rows per shard
    do_sample: jax.Array  # [dp * R] bool
    num_drafts: jax.Array  # [dp * R] drafts among each row's last tokens (speculative decoding)


class InputBatch:
    """Which request holds which slot, and the writes staged for the device state."""

    def __init__(self, num_slots: int, num_kv_groups: int = 1):
        self.num_slots = num_slots
        self.num_kv_groups = num_kv_groups
        self._free = list(range(num_slots - 1, -1, -1))
        self.slot_of: dict[str, int] = {}
        self._prompt_len: dict[str, int] = {}
        # Per request and KV group: (columns of the slot's table that are current, leading nulls).
        self._table_state: dict[str, list[tuple[int, int]]] = {}
        self.history_writes: list[tuple[int, int, int]] = []  # (slot, position, token)
        self.table_writes: list[tuple[int, int, int]] = []  # (group * num_slots + slot, column, block id)
        self.penalty_resets: list[tuple[int, int]] = []  # (slot, prompt length)

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    def update(self, scheduled: SchedulerOutput) -> list[RowPlan]:
        """Apply what changed since the previous step; -> this step's rows, in schedule order."""
        for request_id in scheduled.finished_ids:
            slot = self.slot_of.pop(request_id, None)
            if slot is not None:  # None: finished before it was ever scheduled
                self._free.append(slot)
                del self._prompt_len[request_id], self._table_state[request_id]
        for request_id in scheduled.preempted_ids:
            self._table_state[request_id] = self._empty_tables()  # resumed with whole new tables
        rows = []
        for item in scheduled.scheduled:
            request_id = item.request_id
            if item.is_new:
                assert request_id not in self.slot_of, f"{request_id!r} is new but holds slot {self.slot_of[request_id]}"
                self._add(request_id, item.new_request)
            else:
                assert request_id in self.slot_of, f"{request_id!r} was never scheduled as new"
            slot = self.slot_of[request_id]
            if item.is_new or item.is_resumed:
                self._table_state[request_id] = self._empty_tables()
            state = self._table_state[request_id]
            assert state[0][0] + len(item.new_block_ids) == len(item.block_table), (
                f"{request_id!r}: {len(item.new_block_ids)} new blocks after {state[0][0]} do not make its "
                f"table of {len(item.block_table)}")
            for group, table in enumerate(item.block_tables or (item.block_table,)):
                state[group] = self._stage_table(group * self.num_slots + slot, table, *state[group])
            self._stage_drafts(slot, item)
            rows.append(RowPlan(slot, item.num_computed_tokens, item.num_new_tokens, item.samples, item.shard,
                                self._prompt_len[request_id], len(item.spec_token_ids)))
        return rows

    def _empty_tables(self) -> list[tuple[int, int]]:
        return [(0, 0)] * self.num_kv_groups

    def _stage_table(self, row: int, table: Sequence[int], uploaded: int, nulls: int) -> tuple[int, int]:
        """Stage the writes that bring device row `row` to `table`: columns past the `uploaded`
        ones, and uploaded columns that became null. -> the new (uploaded, leading nulls)."""
        new_nulls = nulls
        while new_nulls < len(table) and table[new_nulls] == 0:
            new_nulls += 1
        self.table_writes.extend((row, column, 0) for column in range(nulls, min(new_nulls, uploaded)))
        self.table_writes.extend((row, column, table[column]) for column in range(uploaded, len(table)))
        return len(table), new_nulls

    def _add(self, request_id: str, new) -> None:
        slot = self._free.pop()
        self.slot_of[request_id] = slot
        self._prompt_len[request_id] = new.prompt_len
        self.history_writes.extend((slot, i, t) for i, t in enumerate(new.token_ids))
        if new.sampling_params is not None and new.sampling_params.uses_penalties:
            self.penalty_resets.append((slot, new.prompt_len))

    def _stage_drafts(self, slot: int, item) -> None:
        """Drafts enter the history at the row's last positions, where the step reads its inputs."""
        first = item.num_computed_tokens + item.num_new_tokens - len(item.spec_token_ids)
        self.history_writes.extend((slot, first + i, t) for i, t in enumerate(item.spec_token_ids))

    def take_writes(self):
        """-> (history writes, table writes, penalty resets) staged so far; cleared."""
        writes = (self.history_writes, self.table_writes, self.penalty_resets)
        self.history_writes, self.table_writes, self.penalty_resets = [], [], []
        return writes


def shard_major_index(rows: Sequence[RowPlan], num_tokens: int, num_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Where each plan row, and each of its tokens, sits in the shard-major batch (shard s owns
    rows [s * num_rows, ...) and tokens [s * num_tokens, ...); plan order kept within a shard)."""
    next_row: dict[int, int] = {}
    next_token: dict[int, int] = {}
    row_index = np.zeros(len(rows), np.int64)
    token_index = []
    for i, r in enumerate(rows):
        local_row = next_row.get(r.shard, 0)
        local_token = next_token.get(r.shard, 0)
        assert local_row < num_rows and local_token + r.num_new <= num_tokens, "shard exceeds its bucket"
        row_index[i] = r.shard * num_rows + local_row
        token_index.append(r.shard * num_tokens + local_token + np.arange(r.num_new))
        next_row[r.shard] = local_row + 1
        next_token[r.shard] = local_token + r.num_new
    return row_index, np.concatenate(token_index) if token_index else np.zeros(0, np.int64)


def step_inputs(rows: Sequence[RowPlan], row_index: np.ndarray, dp: int, num_rows: int) -> dict[str, np.ndarray]:
    """Host arrays of `StepInputs`: plan rows placed shard-major at `row_index`, padding rows empty."""
    slots = np.zeros(dp * num_rows, np.int32)
    num_computed = np.zeros(dp * num_rows, np.int32)
    q_lens = np.zeros(dp * num_rows, np.int32)
    do_sample = np.zeros(dp * num_rows, bool)
    num_drafts = np.zeros(dp * num_rows, np.int32)
    slots[row_index] = [r.slot for r in rows]
    num_computed[row_index] = [r.num_computed for r in rows]
    q_lens[row_index] = [r.num_new for r in rows]
    do_sample[row_index] = [r.sample for r in rows]
    num_drafts[row_index] = [r.num_drafts for r in rows]
    cu = np.zeros((dp, num_rows + 1), np.int32)
    cu[:, 1:] = np.cumsum(q_lens.reshape(dp, num_rows), axis=1)
    num_seqs = np.bincount([r.shard for r in rows], minlength=dp).astype(np.int32)
    return dict(slots=slots, num_computed=num_computed, query_start_loc=cu, num_seqs=num_seqs, do_sample=do_sample,
                num_drafts=num_drafts)
