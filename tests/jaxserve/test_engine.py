"""Engine behaviour on tiny random models: batching, chunking, caching, preemption, isolation,
sampling, stops, compilation. References are single-request runs and model forward passes."""

import math

import numpy as np
import pytest

from jaxserve.compile_stats import backend_compile_count
from jaxserve.sampling_params import SamplingParams
from tests.engine_utils import EOS_ID, random_prompts, tiny_config, tiny_engine, tiny_loaded_model
from tests.helpers import sequence_logits
from tests.jaxserve.test_sampler import reference_penalties

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded_model()


def run(engine, requests, *, stagger=0, rng=None):
    """requests: list of (prompt, SamplingParams); returns final RequestOutputs by index.
    With `stagger`, request i arrives after a random 0..stagger engine steps."""
    pending = list(enumerate(requests))
    arrivals = {i: (rng.integers(0, stagger + 1) if stagger else 0) for i, _ in pending}
    outputs, step = {}, 0
    while pending or engine.has_unfinished_requests():
        for i, (prompt, params) in [p for p in pending if arrivals[p[0]] <= step]:
            engine.add_request(str(i), prompt, params)
            pending.remove((i, (prompt, params)))
        for out in engine.step():
            if out.finished:
                outputs[int(out.request_id)] = out
        step += 1
    return [outputs[i] for i in range(len(requests))]


def assert_same_greedy(got, ref, ref_logprobs, label):
    """DESIGN.md's rule: identical, except from a step where the reference's top-2 margin < 1e-4."""
    for step, (a, b) in enumerate(zip(got, ref)):
        if a != b:
            top2 = sorted((lp.logprob for lp in ref_logprobs[step].values()), reverse=True)[:2]
            margin = top2[0] - top2[1]
            assert margin < 1e-4, f"{label}: diverges at step {step} (margin {margin:.2e})"
            print(f"{label}: near-tie divergence at step {step} (margin {margin:.1e})")
            return
    assert len(got) == len(ref), label


def alone(loaded, prompt, params, **options):
    """The single-request reference: a fresh engine holding only this request."""
    reference = SamplingParams(**{**_params_dict(params), "logprobs": 2})
    return run(tiny_engine(loaded, **options), [(prompt, reference)])[0].outputs[0]


def _params_dict(params):
    return {k: getattr(params, k) for k in ("max_tokens", "temperature", "ignore_eos", "seed", "top_p",
                                             "top_k", "min_p", "n")}


def test_continuous_batching_matches_requests_alone(loaded):
    """24 requests, prompts of 1..300 tokens, staggered arrivals, a 32-token budget (so long
    prompts are chunked and mixed with decodes): each gets the tokens it gets alone."""
    rng = np.random.default_rng(0)
    prompts = random_prompts(rng, 24, 1, 300, 96)
    requests = [(p, SamplingParams(max_tokens=int(rng.integers(1, 16)), **GREEDY)) for p in prompts]
    engine = tiny_engine(loaded, max_num_batched_tokens=32, max_num_seqs=8, request_buckets=(4,),
                         token_buckets=(16,))
    outputs = run(engine, requests, stagger=30, rng=rng)
    chunked = sum(len(p) > 32 for p in prompts)
    assert chunked >= 10, "the workload must exercise chunked prefill"
    for i, ((prompt, params), out) in enumerate(zip(requests, outputs)):
        ref = alone(loaded, prompt, params)
        assert_same_greedy(out.outputs[0].token_ids, ref.token_ids, ref.logprobs, f"request {i}")
        assert out.outputs[0].finish_reason == "length"


def test_greedy_tokens_match_model_forward(loaded):
    """The engine's greedy tokens equal argmax of a plain paged forward over the whole sequence."""
    rng = np.random.default_rng(1)
    prompt = random_prompts(rng, 1, 37, 37, 96)[0]
    out = run(tiny_engine(loaded), [(prompt, SamplingParams(max_tokens=10, **GREEDY))])[0].outputs[0]
    ids = list(prompt)
    for _ in range(10):
        ids.append(int(sequence_logits(loaded.model, ids, block_size=4)[-1].argmax()))
    assert out.token_ids == ids[len(prompt):]


def test_prefix_cache_computes_only_the_new_suffix(loaded):
    rng = np.random.default_rng(2)
    shared = random_prompts(rng, 1, 40, 40, 96)[0]  # 10 full blocks of 4
    first = shared + [5, 6, 7]
    second = shared + [9, 10, 11, 12, 13]
    params = SamplingParams(max_tokens=6, **GREEDY)
    engine = tiny_engine(loaded)
    run(engine, [(first, params)])
    hits_before = engine.kv_manager.prefix_cache_hits
    out = run(engine, [(second, params)])[0]
    assert out.num_cached_tokens == 40
    assert engine.kv_manager.prefix_cache_hits - hits_before == 40
    fresh = run(tiny_engine(loaded, enable_prefix_caching=False), [(second, params)])[0]
    assert fresh.num_cached_tokens == 0
    assert out.outputs[0].token_ids == fresh.outputs[0].token_ids


def test_cache_salt_isolates_tenants(loaded):
    rng = np.random.default_rng(3)
    prompt = random_prompts(rng, 1, 30, 30, 96)[0]
    params = SamplingParams(max_tokens=3, **GREEDY)
    engine = tiny_engine(loaded)
    run(engine, [({"prompt_token_ids": prompt, "cache_salt": "tenant-a"}, params)])
    other = run(engine, [({"prompt_token_ids": prompt, "cache_salt": "tenant-b"}, params)])[0]
    same = run(engine, [({"prompt_token_ids": prompt, "cache_salt": "tenant-a"}, params)])[0]
    assert other.num_cached_tokens == 0
    assert same.num_cached_tokens == 28
    assert other.outputs[0].token_ids == same.outputs[0].token_ids


@pytest.mark.parametrize("poison", [False, True])
def test_preemption_under_a_small_kv_budget(loaded, poison):
    """8 requests needing 14 blocks each share 48 blocks: recompute preemption finishes all of
    them with the unconstrained outputs. With poisoning, freed blocks are NaN: outputs stay
    finite and unchanged, so no request reads a block it does not hold."""
    rng = np.random.default_rng(4)
    prompts = random_prompts(rng, 8, 30, 40, 96)
    requests = [(p, SamplingParams(max_tokens=16, logprobs=1, **GREEDY)) for p in prompts]
    bytes_per_block = 2 * 2 * 2 * 16 * 4 * 4  # K+V, layers, kv heads, head_dim, block 4, f32
    small = tiny_engine(loaded, kv_cache_memory_bytes=48 * bytes_per_block, max_model_len=64,
                        poison_freed_blocks=poison)
    assert small.kv_plan.num_blocks == 48
    outputs = run(small, requests)
    reference = run(tiny_engine(loaded, max_model_len=64), requests)
    assert small.scheduler.num_preemptions > 0
    assert small.metrics.num_preemptions == small.scheduler.num_preemptions
    for i, (out, ref) in enumerate(zip(outputs, reference)):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids, f"request {i}"
        assert all(math.isfinite(next(iter(lp.values())).logprob) for lp in out.outputs[0].logprobs)
    assert small.kv_cache_usage() == 0.0


def test_seeded_sampling_ignores_batch_companions(loaded):
    rng = np.random.default_rng(5)
    prompt = random_prompts(rng, 1, 20, 20, 96)[0]
    seeded = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    solo = run(tiny_engine(loaded), [(prompt, seeded)])[0].outputs[0].token_ids
    companions = [(p, SamplingParams(max_tokens=int(rng.integers(2, 20)), temperature=0.7, ignore_eos=True))
                  for p in random_prompts(rng, 6, 1, 60, 96)]
    crowd = run(tiny_engine(loaded), companions[:3] + [(prompt, seeded)] + companions[3:], stagger=5, rng=rng)
    assert crowd[3].outputs[0].token_ids == solo
    unseeded = run(tiny_engine(loaded, seed=1), [(prompt, SamplingParams(max_tokens=12, temperature=1.0,
                                                                          ignore_eos=True))])
    assert unseeded[0].outputs[0].token_ids != solo  # 12 draws over 96 tokens: a clash is ~impossible


def test_n_children_share_the_prompt_and_vary_by_seed(loaded):
    rng = np.random.default_rng(6)
    prompt = random_prompts(rng, 1, 24, 24, 96)[0]
    engine = tiny_engine(loaded)
    engine.add_request("x", prompt, SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=7, ignore_eos=True))
    children = [engine.children[f"x#{i}"].request for i in range(3)]
    (out,) = [o for _ in range(100) for o in engine.step() if o.finished]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    # Siblings fork from the first child: its 5 full prompt blocks (all but the block of the
    # last prompt token) are shared, not recomputed.
    assert [c.num_cached_tokens for c in children] == [0, 20, 20]
    assert engine.kv_cache_usage() == 0.0
    # Child i samples with seed + i: child 1 equals a lone request seeded 8.
    lone = run(tiny_engine(loaded), [(prompt, SamplingParams(max_tokens=8, temperature=1.0, seed=8,
                                                            ignore_eos=True))])[0]
    assert out.outputs[1].token_ids == lone.outputs[0].token_ids


def test_logprobs_and_prompt_logprobs_match_log_softmax(loaded):
    rng = np.random.default_rng(7)
    prompt = random_prompts(rng, 1, 13, 13, 96)[0]
    out = run(tiny_engine(loaded), [(prompt, SamplingParams(max_tokens=5, logprobs=3, prompt_logprobs=2,
                                                            **GREEDY))])[0]
    ids = prompt + out.outputs[0].token_ids
    logits = sequence_logits(loaded.model, ids, block_size=4).astype(np.float64)
    logprobs = logits - logits.max(-1, keepdims=True)
    logprobs -= np.log(np.exp(logprobs).sum(-1, keepdims=True))
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(ids)):
        entry = out.prompt_logprobs[pos] if pos < len(prompt) else out.outputs[0].logprobs[pos - len(prompt)]
        k = 2 if pos < len(prompt) else 3
        top = np.argsort(-logprobs[pos - 1])[:k]
        assert set(top) <= set(entry), pos
        assert ids[pos] in entry
        for token_id, lp in entry.items():
            assert abs(lp.logprob - logprobs[pos - 1, token_id]) < 1e-4
            assert lp.rank == 1 + int(np.sum(logprobs[pos - 1] > logprobs[pos - 1, token_id] + 1e-6))


def test_penalties_count_the_requests_own_tokens(loaded):
    """Penalties read statistics kept per slot on device: the prompt's tokens and the output's
    counts, restarted when a request takes a slot (here the one a finished request used)."""
    rng = np.random.default_rng(11)
    first, prompt = random_prompts(rng, 2, 12, 12, 96)
    engine = tiny_engine(loaded)
    run(engine, [(first, SamplingParams(max_tokens=10, **GREEDY))])
    penalties = dict(presence_penalty=1.5, frequency_penalty=0.7, repetition_penalty=1.8)
    out = run(engine, [(prompt, SamplingParams(max_tokens=10, **penalties, **GREEDY))])[0].outputs[0].token_ids
    logits = sequence_logits(loaded.model, prompt + out, block_size=4).astype(np.float64)[len(prompt) - 1:]
    for i, token in enumerate(out):
        penalized = reference_penalties(logits[i], prompt, np.asarray(out[:i], int), *penalties.values())
        runner_up, best = np.sort(penalized)[-2:]
        assert token == penalized.argmax() or best - runner_up < 1e-4, i
    assert out != logits[:len(out)].argmax(-1).tolist(), "the penalties should change some token"


def test_stops(loaded):
    rng = np.random.default_rng(8)
    prompt = random_prompts(rng, 1, 10, 10, 96)[0]
    engine = tiny_engine(loaded)
    free = run(engine, [(prompt, SamplingParams(max_tokens=12, **GREEDY))])[0].outputs[0]
    words = free.text.split(" ")
    stop_word = words[5]
    cut = free.text.index(stop_word)
    by_string = run(engine, [(prompt, SamplingParams(max_tokens=12, stop=[stop_word], **GREEDY))])[0].outputs[0]
    assert by_string.text == free.text[:cut] and by_string.finish_reason == "stop"
    assert by_string.stop_reason == stop_word
    kept = run(engine, [(prompt, SamplingParams(max_tokens=12, stop=stop_word, include_stop_str_in_output=True,
                                                **GREEDY))])[0].outputs[0]
    assert kept.text == free.text[:cut + len(stop_word)]
    stop_id = free.token_ids[3]
    by_id = run(engine, [(prompt, SamplingParams(max_tokens=12, stop_token_ids=[stop_id], **GREEDY))])[0].outputs[0]
    first = free.token_ids.index(stop_id)
    assert by_id.token_ids == free.token_ids[:first + 1] and by_id.stop_reason == stop_id
    late = run(engine, [(prompt, SamplingParams(max_tokens=12, stop_token_ids=[stop_id], min_tokens=first + 1,
                                                **GREEDY))])[0].outputs[0]
    assert len(late.token_ids) > first + 1


def test_eos_stops_unless_ignored(loaded):
    """Bias EOS up so greedy picks it: the request stops with it (kept), unless ignore_eos."""
    prompt = [5, 6, 7]
    engine = tiny_engine(loaded)
    stopped = run(engine, [(prompt, SamplingParams(max_tokens=8, temperature=0, logit_bias={EOS_ID: 100.0}))])[0]
    assert stopped.outputs[0].token_ids == [EOS_ID] and stopped.outputs[0].finish_reason == "stop"
    ignored = run(engine, [(prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                                   logit_bias={EOS_ID: 100.0}))])[0]
    assert ignored.outputs[0].token_ids == [EOS_ID] * 8 and ignored.outputs[0].finish_reason == "length"


def test_bad_input_is_rejected_and_others_continue(loaded):
    engine = tiny_engine(loaded)
    engine.add_request("good", [3, 4, 5], SamplingParams(max_tokens=20, **GREEDY))
    bad = [
        ([], SamplingParams(), "prompt"),
        ("", SamplingParams(), "prompt"),
        ([3, 96], SamplingParams(), "prompt_token_ids"),
        ([-1], SamplingParams(), "prompt_token_ids"),
        ([5] * 320, SamplingParams(), "max_model_len"),
    ]
    for prompt, params, field in bad:
        with pytest.raises(ValueError, match=field):
            engine.add_request("bad", prompt, params)
    for kwargs, field in [(dict(max_tokens=0), "max_tokens"), (dict(temperature=float("nan")), "temperature"),
                          (dict(top_p=0.0), "top_p"), (dict(logit_bias={500: 1.0}), "logit_bias")]:
        with pytest.raises(ValueError, match=field):
            engine.add_request("bad", [3], SamplingParams(**kwargs))
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request("good", [3], SamplingParams())
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in outputs] == ["good"] and len(outputs[0].outputs[0].token_ids) == 20


def test_abort_frees_blocks_and_reports(loaded):
    engine = tiny_engine(loaded)
    engine.add_request("a", list(range(2, 40)), SamplingParams(max_tokens=50, **GREEDY))
    engine.add_request("b", [3, 4], SamplingParams(max_tokens=5, **GREEDY))
    for _ in range(4):
        engine.step()
    engine.abort_request("a")
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert finished["a"].outputs[0].finish_reason == "abort"
    assert finished["b"].outputs[0].finish_reason == "length"
    assert engine.kv_cache_usage() == 0.0 and engine.runner.input_batch.num_free_slots == engine.config.max_num_reqs


def test_priority_policy_serves_urgent_first(loaded):
    engine = tiny_engine(loaded, scheduling_policy="priority", max_num_seqs=1)
    order = []
    engine.add_request("late", [3, 4], SamplingParams(max_tokens=2, **GREEDY), priority=5)
    engine.add_request("urgent", [3, 4], SamplingParams(max_tokens=2, **GREEDY), priority=-1)
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["urgent", "late"]


def test_steady_state_adds_no_compilation(loaded):
    """After warm-up, 200 decode-heavy steps with a changing batch compile nothing new."""
    engine = tiny_engine(loaded, compile_at_startup=True, max_num_seqs=8, max_num_batched_tokens=64,
                         request_buckets=(4,), token_buckets=(16,))
    rng = np.random.default_rng(9)

    def workload(count):
        return [(p, SamplingParams(max_tokens=int(rng.integers(5, 40)), **GREEDY))
                for p in random_prompts(rng, count, 1, 60, 96)]

    run(engine, workload(12), stagger=10, rng=rng)  # warm the host-side helpers too
    compiles, variants = backend_compile_count(), len(engine.runner.step_variants)
    steps = 0
    pending = workload(80)
    while steps < 200 and (pending or engine.has_unfinished_requests()):
        if pending and rng.random() < 0.5:
            prompt, params = pending.pop()
            engine.add_request(f"s{steps}", prompt, params)
        engine.step()
        steps += 1
    assert steps == 200
    assert len(engine.runner.step_variants) == variants == engine.runner.num_buckets()
    assert backend_compile_count() == compiles


def test_max_model_len_auto_fits_the_budget(loaded, caplog):
    bytes_per_block = 2 * 2 * 2 * 16 * 4 * 4
    with caplog.at_level("INFO", logger="jaxserve.kv"):
        engine = tiny_engine(loaded, max_model_len="auto", kv_cache_memory_bytes=21 * bytes_per_block)
    assert engine.max_model_len == 80  # 20 usable blocks of 4 tokens
    assert "max_model_len 80 (auto)" in caplog.text
    with pytest.raises(ValueError, match="max_model_len"):
        tiny_engine(loaded, max_model_len=300, kv_cache_memory_bytes=21 * bytes_per_block)
    capped = tiny_engine(loaded, max_model_len="auto", kv_cache_memory_bytes=64 << 20)
    assert capped.max_model_len == loaded.config.max_position_embeddings


def test_stream_deltas_add_up(loaded):
    from jaxserve.llm import LLM

    llm = LLM.__new__(LLM)
    llm.engine, llm.tokenizer = tiny_engine(loaded, stream_interval=3), loaded.tokenizer
    import itertools

    llm._ids = itertools.count()
    params = SamplingParams(max_tokens=10, **GREEDY)
    deltas = list(llm.stream([4, 5, 6], params))
    final = llm.generate([[4, 5, 6]], params, use_tqdm=False)[0].outputs[0]
    assert [len(d.token_ids) for d in deltas] == [1, 3, 3, 3]
    assert sum((d.token_ids for d in deltas), []) == final.token_ids
    assert "".join(d.text for d in deltas) == final.text
    assert deltas[-1].finish_reason == "length" and all(d.finish_reason is None for d in deltas[:-1])


def test_metrics_count_tokens_and_outcomes(loaded):
    engine = tiny_engine(loaded)
    run(engine, [([3, 4, 5], SamplingParams(max_tokens=4, **GREEDY)), ([6, 7], SamplingParams(max_tokens=2, **GREEDY))])
    m = engine.metrics
    assert (m.num_requests, m.prompt_tokens, m.generation_tokens) == (2, 5, 6)
    assert m.finished["length"] == 2 and len(m.ttft) == 2 and len(m.e2e) == 2


def test_start_up_logs_the_kernels_it_chose_and_why(caplog):
    """The engine says which attention and MoE kernels its steps run (pallas_kernels/dispatch.py)."""
    loaded = tiny_loaded_model(tiny_config("MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2))
    with caplog.at_level("INFO", logger="jaxserve.engine"):
        engine = tiny_engine(loaded)
    assert engine.kernels["attention"].backend == "reference" and engine.kernels["moe"].backend == "reference"
    assert "attention kernel: reference (no GPU (cpu): the pure-JAX reference)" in caplog.text
    assert "moe kernel: reference (no GPU (cpu)" in caplog.text
