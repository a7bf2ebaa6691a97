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
from tests.engine_utils import random_prompts, tiny_config, tiny_engine, tiny_loaded_model  # noqa: E402

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
    "ep8_dbo": dict(expert_parallel_size=8, enable_dbo=True),
    "ep4_tp2_dbo": dict(expert_parallel_size=4, tensor_parallel_size=2, enable_dbo=True),
    "dp2_ep4_a2a_dbo": dict(data_parallel_size=2, expert_parallel_size=4, expert_dispatch="all_to_all",
                            enable_dbo=True),
    "ep8_eplb": dict(expert_parallel_size=8, enable_eplb=True, num_redundant_experts=8, eplb_step_interval=6,
                     eplb_window_size=4),
    # FP8 KV cache (per-layer scales beside each layer's caches) on a mesh, against one device.
    "single_fp8": dict(kv_cache_dtype="fp8"),
    "ep4_tp2_fp8": dict(expert_parallel_size=4, tensor_parallel_size=2, kv_cache_dtype="fp8"),
}


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
    from models.expert_parallel import ExpertParallel, ep_moe_ffn, num_physical_slots
    from models.mesh import make_mesh
    from pallas_kernels.moe import moe_ffn_reference

    keys = jax.random.split(jax.random.key(0), 6)
    tokens, hidden, inter, experts, top_k = 20, 16, 8, 6, 2
    x = jax.random.normal(keys[0], (tokens, hidden))
    ids = jnp.stack([jnp.zeros(tokens, jnp.int32), jax.random.randint(keys[1], (tokens,), 1, experts)], axis=1)
    w = jax.random.uniform(keys[2], (tokens, top_k))
    wg, wu = (jax.random.normal(k, (experts, hidden, inter)) for k in keys[3:5])
    wd = jax.random.normal(keys[5], (experts, inter, hidden))
    ref = moe_ffn_reference(x, ids, w, wg, wu, wd)
    scale = float(jnp.abs(ref).max())
    out = {}
    for dp, ep, tp in [(1, 8, 1), (1, 4, 2), (2, 4, 1)]:
        mesh = make_mesh(dp, ep, tp)
        phys = num_physical_slots(experts, ep)

        def pad(a):
            return jnp.concatenate([a, jnp.zeros((phys - experts,) + a.shape[1:], a.dtype)])

        for strategy, factor, drop in [("allgather", 0.0, False), ("all_to_all", 0.0, False),
                                       ("all_to_all", 0.5, False), ("all_to_all", 0.5, True)]:
            layout = ExpertParallel(mesh, phys, strategy, factor, drop)
            got = jax.jit(lambda *a: ep_moe_ffn(*a, layout))(x, ids, w, pad(wg), pad(wu), pad(wd))
            key = f"dp{dp}_ep{ep}_tp{tp}_{strategy}_cf{factor}" + ("_drop" if drop else "")
            out[key] = float(jnp.abs(got - ref).max()) / scale
    return out


def dbo_hlo_cases() -> dict:
    """For each strategy: the compiled HLO's collectives per microbatch and, for each, whether it
    (transitively) reads anything computed under the other microbatch's scope."""
    from models.expert_parallel import ExpertParallel, ep_moe_ffn
    from models.hlo_deps import ancestors, collectives, parse_computations
    from models.mesh import make_mesh

    mesh = make_mesh(1, 8, 1)
    tokens, hidden, inter, experts, top_k = 32, 16, 8, 8, 2
    args = (jnp.ones((tokens, hidden)), jnp.zeros((tokens, top_k), jnp.int32), jnp.ones((tokens, top_k)),
            jnp.ones((experts, hidden, inter)), jnp.ones((experts, hidden, inter)), jnp.ones((experts, inter, hidden)))
    out = {}
    for strategy, min_tokens in [("allgather", 2), ("all_to_all", 2), ("allgather", 64)]:
        layout = ExpertParallel(mesh, experts, strategy, dbo_min_tokens=min_tokens)
        text = jax.jit(lambda *a: ep_moe_ffn(*a, layout)).lower(*args).compile().as_text()
        found = {"microbatch0": 0, "microbatch1": 0, "crossing": []}
        for instrs in parse_computations(text).values():
            for name in collectives(instrs):
                scope = instrs[name]["scope"]
                mine = "microbatch0" if "microbatch0" in scope else "microbatch1" if "microbatch1" in scope else None
                if mine is None:
                    continue
                found[mine] += 1
                other = "microbatch1" if mine == "microbatch0" else "microbatch0"
                if any(other in instrs[a]["scope"] for a in ancestors(instrs, name) if a in instrs):
                    found["crossing"].append(name)
        out[f"{strategy}_min{min_tokens}"] = found
    return out


def main(selected_models, selected_cases) -> dict:
    rng = np.random.default_rng(0)
    prompts = random_prompts(rng, 4, 5, 20, 96)
    results = {"kernel": kernel_cases(), "dbo_hlo": dbo_hlo_cases()} if "kernel" in selected_models else {}
    for name in [m for m in selected_models if m in MODELS]:
        overrides = dict(MODELS[name])
        loaded = tiny_loaded_model(tiny_config(overrides.pop("architecture"), **overrides))
        results[name] = {}
        cases = ["single", "ep8_eplb"] if name in ROUTER_BIAS else selected_cases
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
    models = sys.argv[1].split(",") if len(sys.argv) > 1 else ["kernel", *MODELS]
    cases = sys.argv[2].split(",") if len(sys.argv) > 2 else list(CASES)
    print("RESULT " + json.dumps(main(models, cases)))
