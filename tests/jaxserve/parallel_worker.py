"""Runs parallel engine cases in a process with 8 fake CPU devices; prints one JSON result.

Usage: python -m tests.jaxserve.parallel_worker  (XLA_FLAGS set here, before jax initialises).
Each case serves the same greedy requests with a tiny MoE model; the first case of each model
is the single-device reference. Output: {model: {case: {"tokens", "logprobs", ...}}}.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import contextlib  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from models.moe import SparseMoEBlock  # noqa: E402

from jaxserve.sampling_params import SamplingParams  # noqa: E402
from tests.engine_utils import (  # noqa: E402
    random_prompts, tiny_config, tiny_deepseek_config, tiny_engine, tiny_loaded_model)

MODELS = {
    # Mixtral-like: 8 experts (divides 8), top-2 softmax.
    "mixtral": dict(architecture="MixtralForCausalLM", num_local_experts=8, num_experts_per_tok=2,
                    intermediate_size=32),
    # Qwen3-MoE-like: 6 experts (does not divide 8 or 4), normalised top-2.
    "qwen3moe": dict(architecture="Qwen3MoeForCausalLM", num_experts=6, num_experts_per_tok=2,
                     moe_intermediate_size=32, norm_topk_prob=True, intermediate_size=64),
    # Skewed routing: a forced router bias sends most tokens to experts 0 and 1 (EPLB test).
    "skewed": dict(architecture="Qwen3MoeForCausalLM", num_experts=6, num_experts_per_tok=2,
                   moe_intermediate_size=32, norm_topk_prob=True, intermediate_size=64),
}
ROUTER_BIAS = {"skewed": [4.0, 4.0, 0.0, 0.0, 0.0, 0.0]}

CASES = {
    "single": {},
    "ep8": dict(expert_parallel_size=8),
    "ep8_a2a_overflow": dict(expert_parallel_size=8, expert_dispatch="all_to_all", expert_capacity_factor=0.5),
    "ep4_tp2": dict(expert_parallel_size=4, tensor_parallel_size=2),
    "dp2_ep4_a2a": dict(data_parallel_size=2, expert_parallel_size=4, expert_dispatch="all_to_all"),
    # dbo_min_tokens=2: decode steps (16-token buckets) split too. (EP=8 with DBO: DBO_HLO_CASES.)
    "ep4_tp2_dbo": dict(expert_parallel_size=4, tensor_parallel_size=2, enable_dbo=True, dbo_min_tokens=2),
    "dp2_ep4_a2a_dbo": dict(data_parallel_size=2, expert_parallel_size=4, expert_dispatch="all_to_all",
                            enable_dbo=True, dbo_min_tokens=2),
    # Wide EP with DP attention: 8 dp shards, experts split over them (expert_parallel_size=1).
    "dp8": dict(data_parallel_size=8),
    "dp8_a2a_dbo": dict(data_parallel_size=8, expert_dispatch="all_to_all", enable_dbo=True, dbo_min_tokens=2),
    "ep8_eplb": dict(expert_parallel_size=8, enable_eplb=True, num_redundant_experts=8, eplb_step_interval=6,
                     eplb_window_size=4),
    # EPLB over the expert ranks of wide EP (experts over 8 dp shards).
    "dp8_eplb": dict(data_parallel_size=8, enable_eplb=True, num_redundant_experts=8, eplb_step_interval=6,
                     eplb_window_size=4),
    # FP8 KV cache (per-layer scales beside each layer's caches) on a mesh, against one device.
    "single_fp8": dict(kv_cache_dtype="fp8"),
    "ep4_tp2_fp8": dict(expert_parallel_size=4, tensor_parallel_size=2, kv_cache_dtype="fp8"),
}
# The second model (6 experts: padded slots over 8 devices, renormalised top-k) on the layouts where
# that meets expert parallelism; the DBO and dp8 variants run on the Mixtral-like model only (CI time).
QWEN3MOE_CASES = ("single", "ep8", "ep8_a2a_overflow", "ep4_tp2", "dp2_ep4_a2a", "single_fp8", "ep4_tp2_fp8")


def run(engine, prompts, max_tokens):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=2, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[int(out.request_id)] = out.outputs[0]
    tokens = [outputs[i].token_ids for i in range(len(prompts))]
    logprobs = [[{str(t): lp.logprob for t, lp in pos.items()} for pos in outputs[i].logprobs]
                for i in range(len(prompts))]
    return tokens, logprobs


@contextlib.contextmanager
def router_bias(bias):
    """Add a constant to every router logit of every MoE block (a test-only forced skew)."""
    if bias is None:
        yield
        return
    original = SparseMoEBlock.route

    def route(self, x):
        with jax.named_scope("router"):
            logits = x.astype(jnp.float32) @ self.gate.kernel[...].astype(jnp.float32) + jnp.asarray(bias)
            weights, ids = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), self.config.num_experts_per_tok)
            weights = weights / weights.sum(axis=-1, keepdims=True)
            return ids.astype(jnp.int32), weights

    SparseMoEBlock.route = route
    try:
        yield
    finally:
        SparseMoEBlock.route = original


def kernel_cases() -> dict:
    """ep_moe_ffn against the single-device reference; routing skewed so that every token picks
    expert 0 (all_to_all overflow needs several rounds at capacity factor 0.5)."""
    # (8, 1, 1): experts split over dp shards alone (wide EP with DP attention).
    return ep_against_reference(0, [(1, 8, 1), (1, 4, 2), (2, 4, 1), (8, 1, 1), (2, 2, 2)],
                                [("allgather", 0.0, False), ("all_to_all", 0.0, False),
                                 ("all_to_all", 0.5, False), ("all_to_all", 0.5, True)])


def ep_against_reference(seed: int, meshes, strategies, activation=None) -> dict:
    """Relative error of ep_moe_ffn against moe_ffn_reference per (dp, ep, tp) mesh and
    (strategy, capacity factor, drop), on 20 tokens that all pick expert 0 first; with an
    `activation` (gpt-oss's clamped SwiGLU) the experts carry biases too."""
    from models.expert_parallel import ExpertParallel, ep_moe_ffn, num_physical_slots
    from models.mesh import make_mesh
    from pallas_kernels.moe import moe_ffn_reference

    keys = jax.random.split(jax.random.key(seed), 9)
    tokens, hidden, inter, experts, top_k = 20, 16, 8, 6, 2
    x = jax.random.normal(keys[0], (tokens, hidden))
    ids = jnp.stack([jnp.zeros(tokens, jnp.int32), jax.random.randint(keys[1], (tokens,), 1, experts)], axis=1)
    w = jax.random.uniform(keys[2], (tokens, top_k))
    wg, wu = (jax.random.normal(k, (experts, hidden, inter)) for k in keys[3:5])
    wd = jax.random.normal(keys[5], (experts, inter, hidden))
    biases = () if activation is None else tuple(
        jax.random.normal(k, (experts, n)) for k, n in zip(keys[6:], (inter, inter, hidden)))
    options = {} if activation is None else dict(biases=biases, activation=activation)
    ref = moe_ffn_reference(x, ids, w, wg, wu, wd, **options)
    scale = float(jnp.abs(ref).max())
    out = {}
    for dp, ep, tp in meshes:
        mesh = make_mesh(dp, ep, tp)
        phys = num_physical_slots(experts, dp * ep)

        def pad(a):
            return jnp.concatenate([a, jnp.zeros((phys - experts,) + a.shape[1:], a.dtype)])

        for strategy, factor, drop in strategies:
            layout = ExpertParallel(mesh, phys, strategy, factor, drop)
            run_ep = jax.jit(lambda *a: ep_moe_ffn(*a[:6], layout, **(
                {} if activation is None else dict(biases=a[6:], activation=activation)))[0])
            got = run_ep(x, ids, w, pad(wg), pad(wu), pad(wd), *map(pad, biases))
            key = f"dp{dp}_ep{ep}_tp{tp}_{strategy}"
            if activation is None:  # the plain cases' keys also name the capacity and dropping
                key += f"_cf{factor}" + ("_drop" if drop else "")
            out[key] = float(jnp.abs(got - ref).max()) / scale
    return out


DBO_HLO_CASES = {
    # Both dispatch strategies under each layout: EP alone, EP x TP, and data-parallel attention
    # (the wide-EP layout); all_to_all with a small capacity, so the round count is agreed by a
    # collective in every microbatch.
    "ep8_allgather": dict(expert_parallel_size=8, enable_dbo=True),
    "ep4_tp2_allgather": dict(expert_parallel_size=4, tensor_parallel_size=2, enable_dbo=True),
    "ep4_tp2_a2a_rounds": dict(expert_parallel_size=4, tensor_parallel_size=2, enable_dbo=True,
                               expert_dispatch="all_to_all", expert_capacity_factor=0.5),
    "dp2_ep4_allgather": dict(data_parallel_size=2, expert_parallel_size=4, enable_dbo=True),
    "dp2_ep4_a2a_rounds": dict(data_parallel_size=2, expert_parallel_size=4, enable_dbo=True,
                               expert_dispatch="all_to_all", expert_capacity_factor=0.5),
    # Experts over the dp shards alone: the allgather strategy gathers tokens over dp.
    "dp8_allgather": dict(data_parallel_size=8, enable_dbo=True),
    # Below the threshold (64 tokens per shard must exceed it): not split.
    "dp2_ep4_min128": dict(data_parallel_size=2, expert_parallel_size=4, enable_dbo=True, dbo_min_tokens=128),
}


@contextlib.contextmanager
def unordered_collectives():
    """Negative control: `models.ordering.after` (the collective order's dependences) made a
    no-op everywhere it is used."""
    import models.dbo
    import models.expert_parallel
    import models.ordering

    modules = (models.dbo, models.expert_parallel)
    original = models.ordering.after
    for module in modules:
        module.after = lambda x, *deps: x
    try:
        yield
    finally:
        for module in modules:
            module.after = original


def dbo_hlo_cases() -> dict:
    """`tests.models.hlo_deps.dbo_overlap_report` of the compiled engine step (64 tokens per shard) of
    each DBO_HLO_CASES engine on the Mixtral-like model, plus the negative control."""
    from tests.models.hlo_deps import dbo_overlap_report

    overrides = dict(MODELS["mixtral"])
    loaded = tiny_loaded_model(tiny_config(overrides.pop("architecture"), **overrides))
    out = {}
    for case, options in DBO_HLO_CASES.items():
        out[case] = dbo_overlap_report(tiny_engine(loaded, **options).runner.compiled_step_text(64, 4))
    with unordered_collectives():
        engine = tiny_engine(loaded, **DBO_HLO_CASES["ep4_tp2_a2a_rounds"])
        out["unordered_control"] = dbo_overlap_report(engine.runner.compiled_step_text(64, 4))
    return out


# Data-parallel attention (models/dp_attention.py): a KV pool of 20 blocks of 4 tokens per device,
# so 8 requests of up to 32 tokens cannot all fit one shard's pool (and the single-device
# reference, with one such pool, preempts too).
DP_OPTIONS = dict(max_model_len=64, kv_cache_memory_bytes=20 * 4 * 512)  # 512 bytes per token
DP_CASES = {
    # model -> cases; each compared with that model's "single" run under DP_OPTIONS.
    "mixtral": {"dp2_ep4": dict(data_parallel_size=2, expert_parallel_size=4),
                "dp2_tp2": dict(data_parallel_size=2, tensor_parallel_size=2)},
    "llama": {"dp8": dict(data_parallel_size=8)},
}
COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "all-to-all", "reduce-scatter")


def run_tracking_shards(engine, prompts, max_tokens):
    """`run`, plus every (request, dp shard) placement seen and the preemption count."""
    shards = {}
    original = engine.step

    def step():
        outputs = original()
        shards.update(getattr(engine.kv_manager, "req_to_shard", {}))
        return outputs

    engine.step = step
    tokens, logprobs = run(engine, prompts, max_tokens)
    engine.step = original
    return tokens, logprobs, shards, engine.scheduler.num_preemptions


def prefix_scenario(engine, rng) -> dict:
    """A finishes (its 5 prompt blocks stay cached on its shard); C (long) and E (short, with
    prompt logprobs: per-token outputs of a shard-major batch) start; D = A's prompt + 4 tokens
    must go to A's shard, though C makes it the more loaded one, and compute only its 4 uncached
    tokens."""
    prompt_a, prompt_c, prompt_e, tail = (rng.integers(2, 96, n).tolist() for n in (20, 16, 4, 4))
    greedy = dict(temperature=0.0, ignore_eos=True)
    where, outputs, prompt_logprobs = {}, {}, {}

    def step_until(done):
        while not done():
            for out in engine.step():
                if out.finished:
                    outputs[out.request_id] = out.outputs[0].token_ids
                    prompt_logprobs[out.request_id] = [
                        None if pos is None else {str(t): lp.logprob for t, lp in pos.items()}
                        for pos in out.prompt_logprobs or []]
            where.update(getattr(engine.kv_manager, "req_to_shard", {}))

    engine.add_request("A", prompt_a, SamplingParams(max_tokens=1, **greedy))
    step_until(lambda: "A" in outputs)
    engine.add_request("C", prompt_c, SamplingParams(max_tokens=30, **greedy))
    step_until(lambda: engine.scheduler.requests["C"].num_computed_tokens > 0)
    engine.add_request("E", prompt_e, SamplingParams(max_tokens=30, prompt_logprobs=2, **greedy))
    step_until(lambda: engine.scheduler.requests["E"].num_computed_tokens > 0)
    hits_before = engine.kv_manager.prefix_cache_hits
    engine.add_request("D", prompt_a + tail, SamplingParams(max_tokens=6, **greedy))
    step_until(lambda: engine.scheduler.requests["D"].num_computed_tokens > 0)
    d = engine.scheduler.requests["D"]
    entry = {"D_cached_tokens": d.num_cached_tokens, "D_hits": engine.kv_manager.prefix_cache_hits - hits_before,
             "shards": dict(where)}
    step_until(lambda: not engine.has_unfinished_requests())
    entry["tokens"] = {k: outputs[k] for k in "ACDE"}
    entry["E_prompt_logprobs"] = prompt_logprobs["E"]
    return entry


def cache_collectives(text: str, cache_shape) -> dict:
    """Collectives in compiled HLO text, and those whose line names a KV-cache-sized array
    (global or one shard's slice: [blocks, block_size, ...])."""
    blocks, block_size = cache_shape[0], cache_shape[1]
    lines = [line for line in text.splitlines()
             if "=" in line and any(f" {op}(" in line or f" {op}-start(" in line for op in COLLECTIVES)]
    sizes = {blocks, blocks // 2, blocks // 8}
    touching = [line.strip()[:200] for line in lines if any(f"[{b},{block_size}," in line for b in sizes)]
    return {"collectives": len(lines), "touching_cache": touching}


def dp_hlo_control(engine) -> dict:
    """Negative control for `cache_collectives`: a function that replicates the dp-sharded cache
    must show an all-gather of it."""
    from models.mesh import replicated

    k = engine.runner.kv_caches[0].arrays[0]
    text = jax.jit(lambda c: c * 2, out_shardings=replicated(engine.runner.mesh)).lower(k).compile().as_text()
    return cache_collectives(text, k.shape)


def dp_cases() -> dict:
    from jax.sharding import PartitionSpec as P

    out = {}
    prompts = random_prompts(np.random.default_rng(1), 8, 5, 20, 96)
    for name, cases in DP_CASES.items():
        if name == "llama":
            loaded = tiny_loaded_model(tiny_config())
        else:
            overrides = dict(MODELS[name])
            loaded = tiny_loaded_model(tiny_config(overrides.pop("architecture"), **overrides))
        out[name] = {}
        for case, options in {"single": {}, **cases}.items():
            engine = tiny_engine(loaded, **DP_OPTIONS, **options)
            tokens, logprobs, shards, preemptions = run_tracking_shards(engine, prompts, max_tokens=12)
            entry = {"tokens": tokens, "logprobs": logprobs, "shards": sorted(set(shards.values())),
                     "preemptions": preemptions, "step_executables": engine.runner._step_fn._cache_size(),
                     "num_blocks": engine.kv_plan.num_blocks}
            entry["prefix"] = prefix_scenario(engine, np.random.default_rng(2))
            if case != "single":
                k = engine.runner.kv_caches[0].arrays[0]
                entry["cache_spec"] = str(k.sharding.spec)
                entry["cache_shape"] = list(k.shape)
                entry["cache_is_dp_sharded"] = k.sharding.spec[0] == "dp" and k.sharding.spec == P(*k.sharding.spec)
                entry["hlo"] = cache_collectives(engine.runner.compiled_step_text(16, 4), k.shape)
                entry["hlo_control"] = dp_hlo_control(engine)
            out[name][case] = entry
    return out


def eplb_padding_case() -> dict:
    """One step of 5 real tokens padded to a 16-token bucket on an expert-parallel engine: the
    expert loads it records must count 5 x top_k assignments per MoE layer, not 16 x top_k; with
    DBO too (the two microbatches' loads add up, 3 + 2 real tokens)."""
    from models.mesh import host_value

    overrides = dict(MODELS["mixtral"])
    loaded = tiny_loaded_model(tiny_config(overrides.pop("architecture"), **overrides))
    out = {"expected": 5 * overrides["num_experts_per_tok"]}
    for label, options in (("per_layer", {}), ("per_layer_dbo", dict(enable_dbo=True, dbo_min_tokens=2))):
        engine = tiny_engine(loaded, expert_parallel_size=8, enable_eplb=True, eplb_step_interval=1000, **options)
        engine.add_request("0", list(range(2, 7)), SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
        engine.step()
        out[label] = host_value(engine.runner.eplb.since_change).sum(axis=1).tolist()
    return out


# Golden outputs (tests/fixtures/golden_outputs.json, tests/jaxserve/test_golden_outputs.py): the
# greedy tokens of fixed layouts, recorded once so a refactor of the parallel code must keep them.
GOLDEN_MODELS = ("mixtral", "qwen3moe")
# "deepseek": tests/engine_utils.py DEEPSEEK_TINY. "deepseek_skewed" gets a correction bias that
# sends every token to experts 0 and 1 (it chooses, the weights ignore it): EPLB's test.
# The families' layouts are those their own code meets (MLA heads over tp, the latent cache on dp
# shards, both dispatch strategies, DBO's stages); the generic sweep (ep8, dp8, a2a overflow, each
# with and without DBO) runs once, on the Mixtral-like model above (CI time).
DEEPSEEK_CASES = {
    "single": {},
    "ep4_tp2": CASES["ep4_tp2"],
    "dp2": dict(data_parallel_size=2),
    "dp2_ep4_a2a_dbo": CASES["dp2_ep4_a2a_dbo"],
    "single_fp8": CASES["single_fp8"],
    "dp2_fp8": dict(data_parallel_size=2, kv_cache_dtype="fp8"),
}
DEEPSEEK_EPLB_CASES = {"single": {}, "dp8_eplb": CASES["dp8_eplb"]}


def deepseek_cases(prefix: str = "deepseek", main_cases: dict = DEEPSEEK_CASES, make_loaded=None) -> dict:
    """{"deepseek": {case: entry}, "deepseek_skewed": {case: entry}} as `main` records them (under
    `prefix`, with `main_cases` and the model `make_loaded()` returns: the tiny DeepSeek by default)."""
    from flax import nnx

    from models.deepseek import DeepseekMoE

    def skew(model):
        for _, block in nnx.iter_modules(model):
            if isinstance(block, DeepseekMoE):
                block.gate.e_score_correction_bias[...] = jnp.asarray([4.0, 4.0] + [0.0] * 6)

    make = make_loaded or (lambda: tiny_loaded_model(tiny_deepseek_config()))
    return family_cases(prefix, main_cases, DEEPSEEK_EPLB_CASES, make, skew)


def family_cases(prefix: str, main_cases: dict, eplb_cases: dict, make_loaded, skew) -> dict:
    """{prefix: {case: entry}, prefix + "_skewed": {case: entry}}: the same 4 prompts x 12 greedy
    tokens under each case, the second model skewed by `skew(model)` (every token to experts 0
    and 1) for EPLB."""
    prompts = random_prompts(np.random.default_rng(0), 4, 5, 20, 96)
    out = {}
    for name, cases in ((prefix, main_cases), (f"{prefix}_skewed", eplb_cases)):
        loaded = make_loaded()
        if name == f"{prefix}_skewed":
            skew(loaded.model)
        out[name] = {}
        for case, options in cases.items():
            engine = tiny_engine(loaded, **options)
            tokens, logprobs = run(engine, prompts, max_tokens=12)
            entry = {"tokens": tokens, "logprobs": logprobs, "step_executables": engine.runner._step_fn._cache_size()}
            if engine.runner.eplb is not None:
                entry["eplb"] = engine.runner.eplb.history
            out[name][case] = entry
    return out


# Block-FP8 kept (experts fp8 with block scales, models/moe.py): blocks (out 32, in 24) leave
# ragged last blocks, and a tp=2 shard of the expert intermediate (16 of 32) starts inside a block.
FP8_QUANTIZATION = dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic", weight_block_size=[32, 24])
DEEPSEEK_FP8_CASES = {
    "single": {},
    "ep4_tp2_a2a": dict(expert_parallel_size=4, tensor_parallel_size=2, expert_dispatch="all_to_all",
                        expert_capacity_factor=0.5),
    "dp2_ep4_a2a_dbo": CASES["dp2_ep4_a2a_dbo"],  # the DBO stages pass the scales too (models/dbo.py)
}


def deepseek_fp8_cases() -> dict:
    """{"deepseek_fp8": {case: entry}, "deepseek_fp8_skewed": {case: entry}}: the tiny DeepSeek with
    block-FP8 experts kept, under expert parallelism (both dispatch strategies) against one device,
    and skewed (every token to experts 0 and 1) under EPLB, whose rebalances move the scales too."""
    from models.loader import random_model
    from models.quantization import FP8

    def fp8_loaded():
        loaded = random_model(tiny_deepseek_config(quantization_config=FP8_QUANTIZATION), weight_scale=8.0,
                              fp8_weights="keep")
        assert loaded.model.layers[1].mlp.experts.gate_proj[...].dtype == FP8
        return loaded

    return deepseek_cases("deepseek_fp8", DEEPSEEK_FP8_CASES, fp8_loaded)


# gpt-oss (models/gpt_oss.py): sliding (window 6, below the prompts plus 12 tokens) and full
# layers, sinks, biased experts with the clamped SwiGLU; expert weights 8x the default (random_model
# scales matrices only) so the clamp at 1.0 acts. "gpt_oss_skewed": a router bias sends every
# token to experts 0 and 1 (EPLB's test).
GPT_OSS_TINY = dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32, sliding_window=6,
                    layer_types=["sliding_attention", "full_attention"], swiglu_limit=1.0, attention_bias=True,
                    rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=4.0, beta_fast=32.0,
                                         beta_slow=1.0, truncate=False, original_max_position_embeddings=64))
GPT_OSS_CASES = {
    "single": {},
    "ep4_tp2": CASES["ep4_tp2"],  # the down bias is added once over the tp ranks that sum their outputs
    "dp2_tp2": dict(data_parallel_size=2, tensor_parallel_size=2),  # DP attention, heads (and sinks) over tp
    "dp2_ep4_a2a_dbo": CASES["dp2_ep4_a2a_dbo"],  # the DBO stages pass biases and activation
}
GPT_OSS_EPLB_CASES = {"single": {}, "ep8_eplb": CASES["ep8_eplb"]}


def tiny_gpt_oss():
    """The tiny gpt-oss of GPT_OSS_TINY with its expert weights scaled up (see there)."""
    from flax import nnx

    from models.gpt_oss import GptOssMoE

    loaded = tiny_loaded_model(tiny_config("GptOssForCausalLM", **GPT_OSS_TINY))
    for _, block in nnx.iter_modules(loaded.model):
        if isinstance(block, GptOssMoE):
            for param in (block.experts.gate_proj, block.experts.up_proj, block.experts.down_proj):
                param[...] = param[...] * 8.0
    return loaded


def gpt_oss_kernel_cases() -> dict:
    """ep_moe_ffn with expert biases and the clamped SwiGLU (clamps reached) against the
    single-device reference, relative error per mesh and strategy (tp splits the biases)."""
    from pallas_kernels.moe import ExpertActivation

    return ep_against_reference(1, [(1, 8, 1), (1, 4, 2), (2, 2, 2)],
                                [("allgather", 0.0, False), ("all_to_all", 0.5, False)],
                                activation=ExpertActivation("gpt_oss_clamped", alpha=1.702, limit=2.0))


# MXFP4 experts kept packed (pallas_kernels/mxfp4.py): a tp=2 shard of the expert intermediate
# (16 of 32) starts inside a scale's block of down_proj's rows.
GPT_OSS_MXFP4_CASES = {
    "single": {},
    "ep4_tp2_a2a": DEEPSEEK_FP8_CASES["ep4_tp2_a2a"],
    "dp2_ep4_a2a_dbo": CASES["dp2_ep4_a2a_dbo"],
}


def tiny_gpt_oss_mxfp4():
    """The tiny gpt-oss with its experts kept as MXFP4, 8x the random build's (scales + 3)."""
    from flax import nnx

    from models.gpt_oss import GptOssMoE
    from models.loader import random_model

    config = tiny_config("GptOssForCausalLM", **GPT_OSS_TINY, quantization_config=dict(quant_method="mxfp4"))
    loaded = random_model(config, weight_scale=8.0, fp8_weights="keep")
    for _, block in nnx.iter_modules(loaded.model):
        if isinstance(block, GptOssMoE):
            assert block.experts.gate_proj[...].dtype == jnp.uint8
            for name in ("gate_proj_scale", "up_proj_scale", "down_proj_scale"):
                scale = getattr(block.experts, name)
                scale[...] = scale[...] + 3
    return loaded


def gpt_oss_mxfp4_cases() -> dict:
    """{"gpt_oss_mxfp4": ..., "gpt_oss_mxfp4_skewed": ...}: `gpt_oss_cases` with MXFP4 experts kept."""
    return gpt_oss_cases("gpt_oss_mxfp4", GPT_OSS_MXFP4_CASES, tiny_gpt_oss_mxfp4)


def gpt_oss_cases(prefix: str = "gpt_oss", main_cases: dict = GPT_OSS_CASES, make_loaded=tiny_gpt_oss) -> dict:
    """{"gpt_oss": {case: entry}, "gpt_oss_skewed": {case: entry}, "gpt_oss_kernel": {case: error}}
    as `main` records them (the first two under `prefix`, with `main_cases` and the model
    `make_loaded()` returns; the kernel cases for the plain model only)."""
    from flax import nnx

    from models.gpt_oss import GptOssMoE

    def skew(model):
        for _, block in nnx.iter_modules(model):
            if isinstance(block, GptOssMoE):
                block.router.bias[...] = jnp.asarray([4.0, 4.0] + [0.0] * 6)

    out = {"gpt_oss_kernel": gpt_oss_kernel_cases()} if prefix == "gpt_oss" else {}
    return {**out, **family_cases(prefix, main_cases, GPT_OSS_EPLB_CASES, make_loaded, skew)}


GOLDEN_CASES = {
    "single": {},
    "ep8": dict(expert_parallel_size=8),
    "ep8_a2a": dict(expert_parallel_size=8, expert_dispatch="all_to_all"),
    "ep8_a2a_overflow": CASES["ep8_a2a_overflow"],
    "dp2": dict(data_parallel_size=2),
    "dp2_ep4_dbo": dict(data_parallel_size=2, expert_parallel_size=4, enable_dbo=True, dbo_min_tokens=2),
    "dp2_ep4_a2a_dbo": CASES["dp2_ep4_a2a_dbo"],
    "ep8_eplb": CASES["ep8_eplb"],
}


def golden_cases() -> dict:
    """{model: {case: greedy token ids of 4 prompts x 12 tokens}} for GOLDEN_MODELS x GOLDEN_CASES."""
    prompts = random_prompts(np.random.default_rng(0), 4, 5, 20, 96)
    out = {}
    for name in GOLDEN_MODELS:
        overrides = dict(MODELS[name])
        loaded = tiny_loaded_model(tiny_config(overrides.pop("architecture"), **overrides))
        out[name] = {case: run(tiny_engine(loaded, **options), prompts, max_tokens=12)[0]
                     for case, options in GOLDEN_CASES.items()}
    return out


def main(selected_models, selected_cases) -> dict:
    rng = np.random.default_rng(0)
    prompts = random_prompts(rng, 4, 5, 20, 96)
    results = {"kernel": kernel_cases(), "dbo_hlo": dbo_hlo_cases()} if "kernel" in selected_models else {}
    if "golden" in selected_models:
        results["golden"] = golden_cases()
    if "deepseek" in selected_models:
        results.update(deepseek_cases())
    if "deepseek_fp8" in selected_models:
        results.update(deepseek_fp8_cases())
    if "gpt_oss" in selected_models:
        results.update(gpt_oss_cases())
    if "gpt_oss_mxfp4" in selected_models:
        results.update(gpt_oss_mxfp4_cases())
    if "dp" in selected_models:
        results["dp"] = dp_cases()
        results["eplb_padding"] = eplb_padding_case()
    for name in [m for m in selected_models if m in MODELS]:
        overrides = dict(MODELS[name])
        loaded = tiny_loaded_model(tiny_config(overrides.pop("architecture"), **overrides))
        results[name] = {}
        cases = ["single", "ep8_eplb", "dp8_eplb"] if name in ROUTER_BIAS else [
            c for c in selected_cases if c != "dp8_eplb" and (name != "qwen3moe" or c in QWEN3MOE_CASES)]
        for case in cases:
            with router_bias(ROUTER_BIAS.get(name)):
                engine = tiny_engine(loaded, **CASES[case])
                tokens, logprobs = run(engine, prompts, max_tokens=12)
            entry = {"tokens": tokens, "logprobs": logprobs,
                     "step_executables": engine.runner._step_fn._cache_size()}
            if engine.runner.eplb is not None:
                entry["eplb"] = engine.runner.eplb.history
            results[name][case] = entry
    return results


if __name__ == "__main__":
    models = sys.argv[1].split(",") if len(sys.argv) > 1 else ["kernel", "dp", *MODELS]
    cases = sys.argv[2].split(",") if len(sys.argv) > 2 else list(CASES)
    print("RESULT " + json.dumps(main(models, cases)))
