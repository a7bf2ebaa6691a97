"""Structured outputs (jaxserve/structured_output.py): every sample follows its constraint, a
constrained row changes nothing for its companions, bad constraints are refused before admission.

Behaviour under async scheduling, preemption and n > 1 runs on a tiny random model with a small
byte-level BPE vocabulary (trained here, so llguidance reads it as it reads real ones); the
default model (SmolLM2-135M) answers 50 generated JSON schemas, regexes and choices."""

import dataclasses
import json
import re

import jsonschema
import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from jaxserve.sampling_params import SamplingParams
from jaxserve.sampling_params import StructuredOutputsParams as Constraint
from models.tokenizer import Tokenizer
from tests.engine_utils import EOS_ID, random_prompts, tiny_config, tiny_engine, tiny_loaded_model
from tests.jaxserve.test_engine import run

TINY_VOCAB = 333  # the model's; the tokenizer has 320 ids, the mask's last word is ragged


def json_schema(rng: np.random.Generator, depth: int = 0) -> dict:
    """A random object schema whose instances are short: 1-3 properties among bounded integers and
    numbers, enums, booleans, short strings, short arrays and (once) a nested object; some required."""
    kinds = ["integer", "number", "enum", "boolean", "string", "array"] + (["object"] if depth == 0 else [])
    properties = {}
    for i in range(int(rng.integers(1, 4))):
        kind = kinds[int(rng.integers(len(kinds)))]
        low = int(rng.integers(-50, 50))
        if kind == "integer":
            prop = {"type": "integer", "minimum": low, "maximum": low + int(rng.integers(0, 100))}
        elif kind == "number":
            prop = {"type": "number", "minimum": low / 4, "maximum": low / 4 + float(rng.integers(1, 20))}
        elif kind == "enum":
            prop = {"enum": [f"v{j}" for j in rng.choice(20, int(rng.integers(1, 4)), replace=False)]}
        elif kind == "boolean":
            prop = {"type": "boolean"}
        elif kind == "string":
            prop = {"type": "string", "minLength": 1, "maxLength": int(rng.integers(1, 8))}
        elif kind == "array":
            item = {"type": "integer", "minimum": 0, "maximum": 9} if rng.random() < 0.5 else {"enum": ["a", "b", "c"]}
            prop = {"type": "array", "items": item, "minItems": 1, "maxItems": int(rng.integers(1, 4))}
        else:
            prop = json_schema(rng, depth + 1)
        properties[f"{kind[:3]}{i}"] = prop
    names = list(properties)
    required = [n for n in names if rng.random() < 0.6] or names[:1]
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def byte_level_tokenizer() -> Tokenizer:
    """A 320-id byte-level BPE (every byte a token, as in GPT-2 style vocabularies), "<eos>" = EOS_ID."""
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat"]
    corpus = [json.dumps({"name": "ab" * int(i % 3), "n": i, "tags": ["x", "y"][: i % 3], "ok": i % 2 == 0})
              for i in range(300)] + [" ".join(rng.choice(words, 8)) for _ in range(50)]
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<unk>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    assert hf.token_to_id("<eos>") == EOS_ID
    return Tokenizer(hf, eos_token="<eos>")


@pytest.fixture(scope="module")
def bpe_model():
    loaded = tiny_loaded_model(tiny_config(vocab_size=TINY_VOCAB))
    return dataclasses.replace(loaded, tokenizer=byte_level_tokenizer())


SHORT_OBJECT = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999},
                                                 "tag": {"enum": ["x", "y", "zz"]}, "ok": {"type": "boolean"}},
                "required": ["n", "tag", "ok"], "additionalProperties": False}


def texts(outputs) -> list[str]:
    return [completion.text for out in outputs for completion in out.outputs]


def test_preemption_keeps_each_matcher(bpe_model):
    """6 constrained greedy requests on a KV budget that forces recompute preemption: the same
    tokens as without preemption, every reply valid, every grammar complete."""
    rng = np.random.default_rng(1)
    prompts = random_prompts(rng, 6, 30, 40, 300)
    params = SamplingParams(temperature=0, max_tokens=40, structured_outputs=Constraint(json=SHORT_OBJECT))
    bytes_per_block = 2 * 2 * 2 * 16 * 4 * 4  # K+V, layers, kv heads, head_dim, block 4, f32
    small = tiny_engine(bpe_model, kv_cache_memory_bytes=40 * bytes_per_block, max_model_len=64)
    outputs = run(small, [(p, params) for p in prompts])
    reference = run(tiny_engine(bpe_model, max_model_len=64), [(p, params) for p in prompts])
    assert small.scheduler.num_preemptions > 0
    for out, ref in zip(outputs, reference):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
        assert out.outputs[0].finish_reason == "stop"
        jsonschema.validate(json.loads(out.outputs[0].text), SHORT_OBJECT)
    assert not small.structured.matchers and small.kv_cache_usage() == 0.0


def test_each_of_n_completions_has_its_own_matcher(bpe_model):
    engine = tiny_engine(bpe_model)
    regex = r"(cat|mat|sat)( (on|a|the) (cat|mat)){1,3}\."
    params = SamplingParams(n=4, seed=3, temperature=1.0, max_tokens=30, structured_outputs=Constraint(regex=regex))
    outputs = run(engine, [([5, 6, 7, 8], params), ([9, 10], SamplingParams(n=2, temperature=1.0, max_tokens=6))])
    replies = outputs[0].outputs
    assert len(replies) == 4 and len(set(texts(outputs[:1]))) > 1, "seeded children should differ"
    for reply in replies:
        assert re.fullmatch(regex, reply.text) and reply.finish_reason == "stop", reply.text
    assert not engine.structured.matchers


def test_unconstrained_batches_keep_the_overlap_and_constrained_rows_wait(bpe_model):
    engine = tiny_engine(bpe_model)
    free = [([3, 4, 5], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))] * 3
    run(engine, free)
    assert engine.structured.num_waits == 0 and engine.structured.num_filled_steps == 0
    constrained = SamplingParams(temperature=0, max_tokens=40, structured_outputs=Constraint(json=SHORT_OBJECT))
    (out, *_) = run(engine, [([3, 4, 5], constrained)] + free)
    num_tokens = len(out.outputs[0].token_ids)
    assert engine.structured.num_filled_steps == num_tokens  # one mask per sampled token
    # Every step after its first waited for the one before: the last found the grammar complete.
    assert engine.structured.num_waits == num_tokens


def test_a_rejected_token_ends_only_its_own_request(monkeypatch, caplog):
    """A token its grammar rejects (here: the masks never reach the sampler) ends that request
    alone with "stop", the token dropped; its companions produce what they produce alone."""
    loaded = tiny_loaded_model()
    companions = [(p, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
                  for p in random_prompts(np.random.default_rng(2), 3, 5, 20, 96)]
    engine = tiny_engine(loaded)
    monkeypatch.setattr(engine.structured, "fill_bitmask", lambda bitmask, rows: None)
    # No "{" in the word-level vocabulary: every token but EOS (banned) breaks the JSON grammar.
    bad = ([4, 5, 6], SamplingParams(temperature=0, max_tokens=10, logit_bias={EOS_ID: -100.0},
                                     structured_outputs=Constraint(json_object=True)))
    outputs = run(engine, [bad] + companions)
    assert outputs[0].outputs[0].finish_reason == "stop" and outputs[0].outputs[0].token_ids == []
    assert "breaks its structured-output grammar" in caplog.text
    alone = run(tiny_engine(loaded), companions)
    assert [o.outputs[0].token_ids for o in outputs[1:]] == [o.outputs[0].token_ids for o in alone]
    assert not engine.structured.matchers and engine.kv_cache_usage() == 0.0


# ---- the default model ----


@pytest.mark.default_model
def test_fifty_generated_json_schemas_validate(default_llm):
    rng = np.random.default_rng(16)
    schemas = [json_schema(rng) for _ in range(50)]
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=96, structured_outputs=Constraint(json=schema))
              for i, schema in enumerate(schemas)]
    outputs = default_llm.generate(["A JSON object:"] * len(schemas), params, use_tqdm=False)
    for schema, out in zip(schemas, outputs):
        reply = out.outputs[0]
        assert reply.finish_reason == "stop", (schema, reply.text)
        jsonschema.validate(json.loads(reply.text), schema)
    assert not default_llm.engine.structured.matchers


@pytest.mark.default_model
def test_regex_and_choice_hold_on_every_sample(default_llm):
    regex = r"[0-9]{3}-[a-z]{2,5}"
    choices = ["Paris", "London", "a \"quoted\" city", "Rome\\Roma"]
    sampling = dict(n=4, temperature=1.0, max_tokens=16)
    params = [SamplingParams(seed=1, structured_outputs=Constraint(regex=regex), **sampling),
              SamplingParams(seed=2, structured_outputs=Constraint(choice=choices), **sampling)]
    regex_out, choice_out = default_llm.generate(["Serial number:", "The capital of France is"], params,
                                                 use_tqdm=False)
    for reply in regex_out.outputs:
        assert re.fullmatch(regex, reply.text) and reply.finish_reason == "stop", reply.text
    for reply in choice_out.outputs:
        assert reply.text in choices and reply.finish_reason == "stop", reply.text


@pytest.mark.default_model
def test_constrained_greedy_row_changes_nothing_in_a_batch(default_llm):
    """A constrained greedy request alone equals it batched with unconstrained ones, token for token,
    and those equal themselves alone."""
    constrained = SamplingParams(temperature=0, max_tokens=48, structured_outputs=Constraint(json=SHORT_OBJECT))
    free = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = ["A JSON object:", "The capital of France is", "Once upon a time", "def fibonacci(n):"]
    batch = default_llm.generate(prompts, [constrained, free, free, free], use_tqdm=False)
    alone = [default_llm.generate([p], params, use_tqdm=False)[0]
             for p, params in zip(prompts, [constrained, free, free, free])]
    for together, single in zip(batch, alone):
        assert together.outputs[0].token_ids == single.outputs[0].token_ids, together.prompt
    jsonschema.validate(json.loads(batch[0].outputs[0].text), SHORT_OBJECT)


@pytest.mark.default_model
@pytest.mark.parametrize("constraint, field", [
    (Constraint(json={"type": "object", "properties": {"a": {"type": "nosuchtype"}}}), "json"),
    (Constraint(json='{"type": "object", '), "json"),
    (Constraint(json={"$ref": "#/definitions/missing"}), "json"),
    (Constraint(regex="([a-z]+"), "regex"),
    (Constraint(grammar="start: undefined_rule"), "grammar"),
])
def test_constraints_llguidance_cannot_compile_are_refused_before_admission(default_llm, constraint, field):
    engine = default_llm.engine
    params = SamplingParams(max_tokens=4, structured_outputs=constraint)
    with pytest.raises(ValueError, match=rf"structured_outputs\.{field}: "):
        engine.check_inputs("Hello", params)
    with pytest.raises(ValueError, match=rf"prompt 1: structured_outputs\.{field}: "):
        default_llm.generate(["Hello", "World"], [SamplingParams(max_tokens=4), params], use_tqdm=False)
    assert not engine.has_unfinished_requests() and engine.kv_cache_usage() == 0.0
    assert not engine.structured.matchers
    (out,) = default_llm.generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=0),
                                  use_tqdm=False)
    assert "Paris" in out.outputs[0].text
