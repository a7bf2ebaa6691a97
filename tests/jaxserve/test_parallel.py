"""Parallel engines (mesh, TP, EP with both dispatch strategies, DP attention x EP / TP, EPLB)
against the single-device engine, on 8 fake CPU devices.

The multi-device cases run in one subprocess (tests/jaxserve/parallel_worker.py), so the rest
of the suite keeps its single CPU device; the policy and layout tests below run in-process.
"""

from __future__ import annotations

import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from jaxserve.config import EngineConfig
from jaxserve.eplb import balancedness, rank_loads, rebalance
from models.expert_parallel import ExpertParallel, identity_map, num_physical_slots
from models.mesh import MESH_AXES, spec_for
from tests.helpers import run_parallel_worker
from tests.jaxserve.parallel_worker import CASES, DP_CASES, QWEN3MOE_CASES


@pytest.fixture(scope="module")
def results():
    return run_parallel_worker()


def _compare(got, ref, label, near_tie=1e-4, logprob_tolerance=1e-5):
    """DESIGN.md's greedy rule; logprobs of shared candidates within `logprob_tolerance`."""
    for r, (tokens, ref_tokens) in enumerate(zip(got["tokens"], ref["tokens"])):
        for step, (a, b) in enumerate(zip(tokens, ref_tokens)):
            if a != b:
                top2 = sorted(ref["logprobs"][r][step].values(), reverse=True)[:2]
                assert top2[0] - top2[1] < near_tie, f"{label}: request {r} diverges at step {step}"
                break
            for token, lp in got["logprobs"][r][step].items():
                if token in ref["logprobs"][r][step]:
                    assert abs(lp - ref["logprobs"][r][step][token]) < logprob_tolerance, (label, r, step)


@pytest.mark.slow
@pytest.mark.parametrize("model,case", [
    (model, c) for model in ("mixtral", "qwen3moe") for c in CASES
    if c not in ("single", "dp8_eplb") and "fp8" not in c and (model != "qwen3moe" or c in QWEN3MOE_CASES)])
def test_parallel_engine_matches_single_device(results, model, case):
    got, ref = results[model][case], results[model]["single"]
    assert len(got["tokens"]) == 4 and all(len(t) == 12 for t in got["tokens"])
    _compare(got, ref, f"{model}/{case}")
    # No extra executables: shardings survive a step, a rebalance swaps inputs only.
    assert got["step_executables"] == ref["step_executables"]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mixtral", "qwen3moe"])
def test_fp8_kv_cache_on_a_mesh_matches_single_device(results, model):
    """Same calibrated scales on both sides; K/V differ only by float reordering before they are
    quantized, so a value may land on the other side of an e4m3 rounding step: logprobs within
    1e-3 (an e4m3 step is 6% of a value, but one value moves a logit by far less)."""
    got, ref = results[model]["ep4_tp2_fp8"], results[model]["single_fp8"]
    _compare(got, ref, f"{model}/fp8", near_tie=1e-3, logprob_tolerance=1e-3)
    assert got["step_executables"] == ref["step_executables"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["ep8_eplb", "dp8_eplb"])
def test_eplb_rebalance_balances_skewed_routing(results, case):
    skewed = results["skewed"]
    _compare(skewed[case], skewed["single"], f"skewed/{case}")  # nothing dropped
    history = skewed[case]["eplb"]
    assert len(history) >= 1
    assert history[0]["before"] < 0.5
    assert history[0]["after"] >= 0.9


@pytest.mark.slow
def test_expert_dispatch_kernels_match_reference(results):
    errors = results["kernel"]
    for key, err in errors.items():
        if key.endswith("_drop"):
            # One round at capacity 0.5 cannot carry every assignment to expert 0's rank.
            assert err > 1e-3, f"{key}: overflow was not exercised ({err})"
        else:
            assert err < 1e-5, f"{key}: relative error {err}"


@pytest.mark.slow
@pytest.mark.parametrize("model,case", [(m, c) for m, cases in DP_CASES.items() for c in cases])
def test_dp_attention_matches_single_device(results, model, case):
    """Each dp shard attends against its own pool (KV budget per device, 20 blocks): requests
    spread over every shard, shards preempt on their own, and greedy tokens and logprobs match
    one device with one such pool."""
    got, ref = results["dp"][model][case], results["dp"][model]["single"]
    assert len(got["tokens"]) == 8 and all(len(t) == 12 for t in got["tokens"])
    _compare(got, ref, f"dp/{model}/{case}")
    dp = DP_CASES[model][case]["data_parallel_size"]
    assert got["shards"] == list(range(dp)), got["shards"]
    assert got["cache_shape"][0] == dp * got["num_blocks"] and got["cache_spec"].startswith("P('dp'")
    assert ref["preemptions"] > 0
    if dp == 2:  # 8 requests of up to 8 blocks over two pools of 19 usable blocks
        assert got["preemptions"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("model,case", [(m, c) for m, cases in DP_CASES.items() for c in cases])
def test_dp_prefix_hit_is_served_by_the_shard_that_cached_it(results, model, case):
    """A's prompt blocks are cached on A's shard; C (long) runs there, E (short) on another
    shard; D = A's prompt + 4 tokens goes to A's shard anyway (longest hit beats least loaded)
    and computes only its 4 uncached tokens."""
    got, ref = results["dp"][model][case]["prefix"], results["dp"][model]["single"]["prefix"]
    shards = got["shards"]
    assert shards["D"] == shards["A"] == shards["C"] != shards["E"], shards
    assert got["D_cached_tokens"] == got["D_hits"] == 20 == ref["D_cached_tokens"]
    assert got["tokens"] == ref["tokens"]
    # Prompt logprobs (per-token outputs) come back in request order from the shard-major batch.
    assert len(got["E_prompt_logprobs"]) == 4 and got["E_prompt_logprobs"][0] is None
    for pos, ref_pos in zip(got["E_prompt_logprobs"][1:], ref["E_prompt_logprobs"][1:]):
        assert pos.keys() == ref_pos.keys()
        assert all(abs(pos[t] - ref_pos[t]) < 1e-5 for t in pos), (pos, ref_pos)


@pytest.mark.slow
@pytest.mark.parametrize("model,case", [(m, c) for m, cases in DP_CASES.items() for c in cases])
def test_dp_step_never_moves_the_kv_cache_across_devices(results, model, case):
    """No collective in the compiled step touches a KV-cache-sized array (the whole cache or
    one shard's slice); the same check flags the all-gather of a function that replicates it."""
    got = results["dp"][model][case]
    assert got["hlo"]["touching_cache"] == [], got["hlo"]
    assert got["hlo"]["collectives"] > 0  # the parser sees the step's collectives
    assert any("all-gather" in line for line in got["hlo_control"]["touching_cache"]), got["hlo_control"]


@pytest.mark.slow
def test_eplb_loads_count_only_real_tokens(results):
    """5 real tokens in a 16-token bucket: every MoE layer records 5 x top_k assignments."""
    padding = results["eplb_padding"]
    assert padding["per_layer"] == [padding["expected"]] * len(padding["per_layer"]), padding
    assert padding["per_layer_dbo"] == padding["per_layer"], padding


# ---- in-process: rules table, placement policy, config validation ----

def test_rules_table_shards_heads_experts_and_drops_non_dividing_axes():
    mesh = AbstractMesh((2, 4, 2), MESH_AXES)
    assert spec_for(("embed", "q_heads"), (64, 64), mesh) == P(None, "tp")
    # Experts over dp x ep (the expert group spans the dp shards).
    assert spec_for(("expert", "embed", "mlp"), (8, 64, 32), mesh) == P(("dp", "ep"), None, "tp")
    assert spec_for(("expert", "embed", "mlp"), (6, 64, 32), mesh) == P(None, None, "tp")  # 6 % 8 != 0
    assert spec_for(("expert", "embed", "mlp"), (8, 64, 32), AbstractMesh((8, 1, 1), MESH_AXES)) == P("dp", None, None)
    # KV cache: blocks over dp (one pool per shard); 1 KV head stays whole over tp=2.
    assert spec_for(("cache_blocks", None, "cache_heads", None), (10, 4, 1, 16), mesh) == P("dp", None, None, None)
    assert spec_for(("batch", "embed"), (16, 64), mesh) == P(("dp", "ep"), None)


def test_physical_slots_pad_to_a_multiple_of_ep():
    assert num_physical_slots(60, 8) == 64
    assert num_physical_slots(60, 8, num_redundant=8) == 72
    ident = identity_map(60, 64, 1)
    assert (ident["phys_to_logical"][60:] == -1).all() and (ident["replica_table"][:, 0] == np.arange(60)).all()


@pytest.mark.parametrize("num_experts", [6, 8, 60, 128])
def test_rebalance_is_a_valid_placement_and_balances_skew(num_experts):
    rng = np.random.default_rng(num_experts)
    load = 1000.0 / np.arange(1, num_experts + 1) ** 1.5
    rng.shuffle(load)
    physical = num_physical_slots(num_experts, 8, 8)
    new = rebalance(load, physical, ep_size=8, max_replicas=9)
    p2l, table, count = new["phys_to_logical"], new["replica_table"], new["replica_count"]
    assert (count >= 1).all() and count.sum() == (p2l >= 0).sum()
    for e in range(num_experts):  # every replica the table names holds its expert
        assert (p2l[table[e, :count[e]]] == e).all()
    identity = identity_map(num_experts, physical, 1)
    before = balancedness(rank_loads(load, identity["phys_to_logical"], identity["replica_count"], 8))
    after = balancedness(rank_loads(load, p2l, count, 8))
    assert before < 0.6 and after >= 0.9, (before, after)


def test_parallel_options_are_validated():
    with pytest.raises(ValueError, match="expert_dispatch"):
        EngineConfig(model="x", expert_dispatch="ring")
    with pytest.raises(ValueError, match="expert_capacity_factor"):
        EngineConfig(model="x", expert_capacity_factor=-1.0)
    with pytest.raises(ValueError, match="num_redundant_experts"):
        EngineConfig(model="x", num_redundant_experts=-2)
    with pytest.raises(ValueError, match="strategy"):
        ExpertParallel(AbstractMesh((1, 8, 1), MESH_AXES), 8, "ring")
    with pytest.raises(ValueError, match="multiple of the expert ranks"):
        ExpertParallel(AbstractMesh((1, 8, 1), MESH_AXES), 12)


@pytest.mark.slow
def test_dbo_microbatch_chains_can_overlap_in_compiled_step(results):
    """The compiled engine step with DBO, under EP, EP x TP and DP x EP with both dispatch
    strategies: both microbatches run attention and the MoE block in every layer, each with its
    own collectives; microbatch 0 never reads microbatch 1; the pairs the overlapped schedule
    runs side by side (models/dbo.py) depend on each other in neither direction; and XLA merged
    no collective of one microbatch with one of the other."""
    hlo = results["dbo_hlo"]
    for case in ("ep8_allgather", "ep4_tp2_allgather", "ep4_tp2_a2a_rounds", "dp2_ep4_allgather",
                 "dp2_ep4_a2a_rounds", "dp8_allgather"):
        report = hlo[case]
        for layer in (0, 1):
            for mb in (0, 1):
                assert report["groups"].get(f"{layer}/{mb}/attention", 0) > 0, (case, layer, mb)
                combine = report["collectives"].get(f"{layer}/{mb}/combine", 0)
                assert combine >= 1, (case, layer, mb, report["collectives"])
                if "a2a" in case or "dp8" in case:  # allgather over one dp shard dispatches nothing
                    assert report["collectives"].get(f"{layer}/{mb}/dispatch", 0) >= 2, (case, report["collectives"])
        assert report["mb0_reads_mb1"] == [], (case, report["mb0_reads_mb1"][:10])
        assert report["coupled"] == [] and report["unscoped_coupling"] == [], (case, report)
    # Below the token threshold the step is not split.
    assert hlo["dp2_ep4_min128"]["groups"] == {}
    # Negative control: without the collective order XLA merges collectives of the two
    # microbatches into one, and the check sees microbatch 0 wait on microbatch 1.
    control = hlo["unordered_control"]
    assert control["mb0_reads_mb1"] and control["unscoped_coupling"], control


def test_dbo_needs_expert_parallelism():
    with pytest.raises(ValueError, match="enable_dbo"):
        EngineConfig(model="x", enable_dbo=True)


def test_memory_table_from_shardings():
    from jaxserve.benchmarks.memory_table import QWEN3_235B, table

    tp, ep = table(QWEN3_235B)
    # 235B parameters in bf16; TP=8 splits all but norms, router and 4 KV heads (< 8) evenly.
    assert 4.6e11 < tp["param_bytes_total"] < 4.8e11
    assert abs(tp["param_bytes_per_device"] - tp["param_bytes_total"] / 8) / tp["param_bytes_per_device"] < 0.02
    # EP + attention DP replicates attention and embeddings, but every device keeps only its own
    # requests' KV: more KV tokens in the system despite less free memory per device.
    assert ep["param_bytes_per_device"] > tp["param_bytes_per_device"]
    assert ep["kv_tokens_system"] == 8 * ep["kv_tokens_per_device"] > tp["kv_tokens_system"]
    assert tp["kv_bytes_per_token_per_device"] == 2 * 94 * 4 * 128 * 2  # 4 KV heads replicated over tp=8
