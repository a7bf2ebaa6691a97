"""Draft-head speculation ("eagle3", "mtp") on tiny random models.

The EAGLE-3 head is written in the published format (config.json + safetensors, `midlayer.*`,
`fc`, `d2t`) and loaded by path; the MTP head is a tiny DeepSeek-V3's own MTP layer. Checked:
greedy outputs equal those without speculation for k in {1, 3, 5}; every draft the engine
proposed is the head's own prediction computed afresh over the whole sequence (one pass of the
target, one of the head, then k - 1 head steps), so the metrics equal the acceptance recomputed
from the outputs; chunked prefill, prefix hits, preemption, penalties, logprobs and n > 1 in one
mixed batch; no block leaks; loader errors that name the tensor or field.

Targets use weights at 1x the N(0, 0.02) default: their greedy tokens favour a few ids, and the
EAGLE-3 head's draft vocabulary is the tokens it repeats, so drafts are often accepted and often
not.
"""

import collections
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from jaxserve.engine import EngineCore
from jaxserve.sampling_params import SamplingParams
from models.eagle3 import load_eagle3
from models.kv_spec import allocate
from models.layers import AttentionMetadata
from models.loader import random_model
from models.registry import kv_spec
from models.weights import WeightError
from tests.engine_utils import DEEPSEEK_TINY, random_prompts, tiny_config, tiny_engine, tiny_engine_config
from tests.jaxserve.spec_decode.test_spec_engine import run_random_requests, token_ids
from tests.jaxserve.test_engine import run

GREEDY = dict(temperature=0.0, ignore_eos=True)
AUX_LAYERS = [0, 2, 3]


def target_model(config, seed=0):
    loaded = random_model(config, seed=seed, weight_scale=1.0)
    return dataclasses.replace(loaded, source=f"tiny-heads-{config.architecture}-{seed}", name="tiny")


@pytest.fixture(scope="module")
def llama():
    return target_model(tiny_config(num_hidden_layers=4))


@pytest.fixture(scope="module")
def deepseek():
    return target_model(tiny_config("DeepseekV3ForCausalLM", **DEEPSEEK_TINY))


def write_eagle3_head(folder, target, draft_vocab=(5, 6, 7, 8), seed=0, aux_layers=AUX_LAYERS, **config_overrides):
    """A random EAGLE-3 head for `target` (a ModelConfig) in the published format; -> its tensors."""
    rng = np.random.default_rng(seed)
    hidden, heads, kv_heads, head_dim, inter = target.hidden_size, 4, 2, 16, 96

    def w(*shape, scale=0.3):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def norm():
        return 1 + w(hidden, scale=0.1)

    tensors = {
        "fc.weight": w(hidden, 3 * hidden, scale=0.1),
        "midlayer.input_layernorm.weight": norm(), "midlayer.hidden_norm.weight": norm(),
        "midlayer.post_attention_layernorm.weight": norm(),
        "midlayer.self_attn.q_proj.weight": w(heads * head_dim, 2 * hidden),
        "midlayer.self_attn.k_proj.weight": w(kv_heads * head_dim, 2 * hidden),
        "midlayer.self_attn.v_proj.weight": w(kv_heads * head_dim, 2 * hidden),
        "midlayer.self_attn.o_proj.weight": w(hidden, heads * head_dim),
        "midlayer.mlp.gate_proj.weight": w(inter, hidden), "midlayer.mlp.up_proj.weight": w(inter, hidden),
        "midlayer.mlp.down_proj.weight": w(hidden, inter),
        "norm.weight": norm(), "lm_head.weight": w(len(draft_vocab), hidden),
        "d2t": (np.asarray(draft_vocab) - np.arange(len(draft_vocab))).astype(np.int64),
        "t2d": np.isin(np.arange(target.vocab_size), draft_vocab),
    }
    config = {"architectures": ["LlamaForCausalLMEagle3"], "hidden_size": hidden, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "head_dim": head_dim, "intermediate_size": inter,
              "rms_norm_eps": 1e-5, "vocab_size": target.vocab_size, "draft_vocab_size": len(draft_vocab),
              "eagle_config": {"eagle_aux_hidden_state_layer_ids": aux_layers}, **config_overrides}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return tensors


@pytest.fixture(scope="module")
def draft_vocab(llama):
    """The tokens that the Llama target repeats for a whole output on the tests' prompts (it
    falls into such loops at these weights): the head picks among them by its hidden state."""
    outputs = run(tiny_engine(llama), [(p, SamplingParams(max_tokens=16, **GREEDY)) for p in prompts_for(0)])
    vocab = sorted({o.outputs[0].token_ids[0] for o in outputs if len(set(o.outputs[0].token_ids)) == 1})
    assert len(vocab) >= 2, "the target no longer loops on two prompts: pick other prompts"
    return vocab


@pytest.fixture(scope="module")
def head_folder(llama, draft_vocab, tmp_path_factory):
    folder = tmp_path_factory.mktemp("eagle3") / "head"
    write_eagle3_head(folder, llama.config, draft_vocab)
    return folder


def spec_for(method, k, head_folder):
    spec = {"method": method, "num_speculative_tokens": k}
    return {**spec, "model": str(head_folder)} if method == "eagle3" else spec


def prompts_for(seed, count=6):
    return [p * 2 for p in random_prompts(np.random.default_rng(seed), count, 5, 12, 96)]


# k = 1 (the catch-up pass alone) and k = 5 (four draft steps), one method each; both methods
# also run at k = 3 in test_drafts_are_the_heads_predictions_and_metrics_match_them.
@pytest.mark.parametrize("method, k", [("eagle3", 1), ("mtp", 5)])
def test_greedy_matches_without_speculation(llama, deepseek, head_folder, method, k):
    target = llama if method == "eagle3" else deepseek
    requests = [(p, SamplingParams(max_tokens=24, **GREEDY)) for p in prompts_for(0)]
    plain = run(tiny_engine(target), requests)
    engine = EngineCore(tiny_engine_config(speculative_config=spec_for(method, k, head_folder)), loaded=target)
    assert token_ids(run(engine, requests)) == token_ids(plain)
    m = engine.metrics
    assert m.spec_decode_num_draft_tokens > 0 and engine.kv_cache_usage() == 0.0


# ---- the drafts are the head's own predictions ----

BLOCK, LENGTH = 4, 64  # the reference's cache blocks, and the longest sequence it scores


def reference_drafter(model, head, k):
    """-> drafts(tokens): the head's k drafts after `tokens` (the last one not yet in the target's
    cache), computed over the whole sequence in fresh caches: the target over tokens[:-1] (its
    captured streams, or final hidden states), the head over positions 0 .. n - 1 with the tokens
    after them, then k - 1 head steps on its own drafts. `head` None: the target's MTP layer.
    One jitted program: sequences are padded to LENGTH."""
    graphdef, state = nnx.split(model)
    head_graphdef, head_state = (None, None) if head is None else nnx.split(head)
    num_blocks = (LENGTH + k) // BLOCK + 2
    tables = jnp.arange(1, num_blocks + 1, dtype=jnp.int32)[None]

    def meta(positions, valid, query_start_loc, seq_len):
        return AttentionMetadata(slot_mapping=jnp.where(valid, (1 + positions // BLOCK) * BLOCK + positions % BLOCK, 0),
                                 query_start_loc=query_start_loc, seq_lens=jnp.reshape(seq_len, (1,)),
                                 block_tables=tables, num_seqs=jnp.asarray(1, jnp.int32), token_mask=valid)

    @jax.jit
    def drafts(state, head_state, tokens, n):
        model = nnx.merge(graphdef, state)
        drafter = model.mtp[0] if head_graphdef is None else nnx.merge(head_graphdef, head_state)
        caches = [allocate(layer, num_blocks + 1, BLOCK, jnp.float32) for layer in kv_spec(model.config).layers]
        positions = jnp.arange(LENGTH, dtype=jnp.int32)
        valid = positions < n
        full = meta(positions, valid, jnp.stack([0, n]).astype(jnp.int32), n)
        if head_graphdef is None:
            features, _ = model(tokens[:LENGTH], positions, caches, full)
        else:
            _, _, features = model(tokens[:LENGTH], positions, caches, full, capture=drafter.aux_layers)
        cache = allocate(drafter.kv_layer, num_blocks + 1, BLOCK, jnp.float32)
        hidden, cache = drafter(model, drafter.project(model, features), tokens[1:], positions, cache, full)
        hidden = hidden[n - 1][None]
        token = drafter.draft_tokens(model, hidden)

        def step(carry, position):
            hidden, token, cache = carry
            one = jnp.reshape(position, (1,))
            hidden, cache = drafter(model, hidden, token, one, cache,
                                    meta(one, jnp.ones(1, bool), jnp.asarray([0, 1], jnp.int32), position + 1))
            token = drafter.draft_tokens(model, hidden)
            return (hidden, token, cache), token[0]

        _, rest = jax.lax.scan(step, (hidden, token, cache), n + jnp.arange(k - 1, dtype=jnp.int32))
        return jnp.concatenate([token, rest])

    def run(tokens):
        padded = np.zeros(LENGTH + 1, np.int32)
        padded[: len(tokens)] = tokens
        return np.asarray(drafts(state, head_state, jnp.asarray(padded), len(tokens) - 1)).tolist()

    return run


def recomputed_acceptance(drafter, prompt, output, k, max_tokens):
    """(rows verified, drafts, accepted) that greedy speculation with this head must have had to
    produce `output`: at each step the head's drafts after the tokens so far, accepted while they
    agree with the output."""
    rows = drafts = accepted = 0
    pos = 1  # the prompt's step samples the first token; the drafts it makes ride in the next step
    while pos < len(output):
        guess = drafter(prompt + output[:pos])[: min(k, max_tokens - pos - 1)]
        agree = 0
        while agree < len(guess) and pos + agree < len(output) and guess[agree] == output[pos + agree]:
            agree += 1
        rows, drafts, accepted = rows + bool(guess), drafts + len(guess), accepted + agree
        pos += agree + 1
    return rows, drafts, accepted


@pytest.mark.parametrize("method", ["eagle3", "mtp"])
def test_drafts_are_the_heads_predictions_and_metrics_match_them(llama, deepseek, head_folder, method):
    """k = 3, with chunked prefill (8-token chunks) and partial acceptance: positions past the
    accepted drafts hold stale head cache, which the next step's catch-up pass must rewrite
    before it reads them. Outputs equal those without speculation."""
    k, max_tokens = 3, 16
    target = llama if method == "eagle3" else deepseek
    head = load_eagle3(head_folder, llama.config) if method == "eagle3" else None
    prompts = prompts_for(0, count=4)
    requests = [(p, SamplingParams(max_tokens=max_tokens, **GREEDY)) for p in prompts]
    options = dict(token_buckets=(64,), long_prefill_token_threshold=8)  # room for every draft
    engine = EngineCore(tiny_engine_config(speculative_config=spec_for(method, k, head_folder), **options),
                        loaded=target)
    outputs = run(engine, requests)
    assert token_ids(outputs) == token_ids(run(tiny_engine(target, **options), requests))
    drafter = reference_drafter(target.model, head, k)
    totals = np.sum([recomputed_acceptance(drafter, p, o.outputs[0].token_ids, k, max_tokens)
                     for p, o in zip(prompts, outputs)], axis=0)
    m = engine.metrics
    assert (m.spec_decode_num_drafts, m.spec_decode_num_draft_tokens, m.spec_decode_num_accepted_tokens) == tuple(totals)
    assert 0 < m.spec_decode_num_accepted_tokens < m.spec_decode_num_draft_tokens  # some accepted, some not


def test_mixed_batch_chunked_prefill_prefix_hits_preemption_and_n(llama, head_folder):
    bytes_per_block = 2 * 4 * 2 * 16 * 4 * 4  # K+V, layers, kv heads, head_dim, block 4, f32
    prompts = prompts_for(2, count=8)
    params = [SamplingParams(max_tokens=20, presence_penalty=0.5, **GREEDY),
              SamplingParams(max_tokens=20, logprobs=2, **GREEDY),
              SamplingParams(max_tokens=20, n=2, **GREEDY),
              SamplingParams(max_tokens=20, min_tokens=6, temperature=0.0),
              SamplingParams(max_tokens=9, **GREEDY)]
    requests = [(p, params[i % len(params)]) for i, p in enumerate(prompts)]
    options = dict(kv_cache_memory_bytes=40 * bytes_per_block, max_model_len=64, long_prefill_token_threshold=8,
                   poison_freed_blocks=True)
    plain = tiny_engine(llama, **options)
    engine = EngineCore(tiny_engine_config(speculative_config=spec_for("eagle3", 3, head_folder), **options),
                        loaded=llama)
    for _ in range(2):  # the second pass hits the prefix cache
        assert token_ids(run(engine, requests)) == token_ids(run(plain, requests))
    assert engine.scheduler.num_preemptions > 0 and engine.kv_manager.prefix_cache_hits > 0
    assert engine.metrics.spec_decode_num_accepted_tokens > 0 and engine.kv_cache_usage() == 0.0
    # The head's cache layer (K and V, 2 heads x 16) is in the budget: a block costs 5/4 of the target's.
    assert engine.kv_plan.bytes_per_block == plain.kv_plan.bytes_per_block * 5 // 4
    assert engine.kv_plan.num_blocks == 40 * 4 // 5


def test_no_block_leaks_after_1000_random_requests(deepseek):
    """MTP speculation under a KV budget small enough to preempt: greedy and sampled rows, n,
    aborts; every block is back at the end."""
    engine = EngineCore(tiny_engine_config(speculative_config=spec_for("mtp", 3, None), max_model_len=64,
                                           kv_cache_memory_bytes=48 * 4 * 2 * 40 * 4), loaded=deepseek)

    def new_request(rng):
        return rng.integers(2, 96, int(rng.integers(2, 20))).tolist(), SamplingParams(
            max_tokens=int(rng.integers(1, 14)), temperature=float(rng.choice([0.0, 1.0])),
            n=int(rng.choice([1, 1, 2])), stop_token_ids=[int(rng.integers(2, 96))],
            ignore_eos=bool(rng.integers(0, 2)))

    run_random_requests(engine, np.random.default_rng(7), new_request)
    assert engine.scheduler.num_preemptions > 0 and engine.metrics.spec_decode_num_accepted_tokens > 0


# ---- configuration and loading errors ----

def test_mtp_needs_a_model_with_mtp_layers(llama):
    with pytest.raises(ValueError, match="'mtp' needs a model with multi-token-prediction layers"):
        EngineCore(tiny_engine_config(speculative_config=spec_for("mtp", 2, None)), loaded=llama)


@pytest.mark.parametrize("change, message", [
    (dict(config={"architectures": ["LlamaForCausalLM"]}), "architectures"),
    (dict(config={"eagle_config": {"eagle_aux_hidden_state_layer_ids": [0, 2, 9]}}),
     "eagle_aux_hidden_state_layer_ids must be three layers of the target's 4"),
    (dict(config={"hidden_size": 32}), r"hidden_size \(32\) must be the target's \(64\)"),
    (dict(drop="midlayer.hidden_norm.weight"), "lacks midlayer.hidden_norm.weight"),
    (dict(drop="d2t"), "needs the d2t mapping"),
    (dict(replace=("fc.weight", np.zeros((64, 64), np.float32))), r"'fc.weight' has shape \(64, 64\), expected \(64, 192\)"),
    (dict(replace=("d2t", np.full(4, 200, np.int64))), "d2t must map 4 draft ids into the target's vocabulary of 96"),
    (dict(replace=("midlayer.extra.weight", np.zeros(3, np.float32))), "'midlayer.extra.weight' is not part of"),
])
def test_bad_eagle3_head_names_the_problem(llama, tmp_path, change, message):
    from safetensors.numpy import load_file

    folder = tmp_path / "head"
    write_eagle3_head(folder, llama.config)
    config = json.loads((folder / "config.json").read_text())
    config.update(change.get("config", {}))
    (folder / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(folder / "model.safetensors"))
    tensors.pop(change.get("drop"), None)
    if "replace" in change:
        tensors[change["replace"][0]] = change["replace"][1]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises((ValueError, WeightError), match=message):
        load_eagle3(folder, llama.config)


def test_eagle3_head_loads_the_published_names(llama, tmp_path):
    """Linear weights are transposed into kernels, `layers.0.` reads as `midlayer.`, and a head
    with its own embedding keeps it."""
    from safetensors.numpy import load_file

    folder = tmp_path / "head"
    tensors = write_eagle3_head(folder, llama.config)
    renamed = {name.replace("midlayer.", "layers.0."): value for name, value in tensors.items()}
    renamed["embed_tokens.weight"] = np.ones((96, 64), np.float32)
    save_file(renamed, str(folder / "model.safetensors"))
    head = load_eagle3(folder, llama.config)
    np.testing.assert_array_equal(np.asarray(head.fc.kernel[...]), tensors["fc.weight"].T)
    np.testing.assert_array_equal(np.asarray(head.midlayer.self_attn.q_proj.kernel[...]),
                                  tensors["midlayer.self_attn.q_proj.weight"].T)
    np.testing.assert_array_equal(np.asarray(head.midlayer.hidden_norm.weight[...]),
                                  tensors["midlayer.hidden_norm.weight"])
    np.testing.assert_array_equal(np.asarray(head.d2t[...]) + np.arange(4), [5, 6, 7, 8])  # the default vocabulary
    assert head.aux_layers == tuple(AUX_LAYERS) and head.embed_tokens is not None
    assert load_file(str(folder / "model.safetensors")).keys() == renamed.keys()
