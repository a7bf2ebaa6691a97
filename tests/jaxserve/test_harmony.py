"""gpt-oss chats in OpenAI's Harmony format (jaxserve/harmony.py): prompts equal the
openai-harmony package's own rendering, replies split into reasoning (analysis), content (final,
commentary preambles) and function calls, streamed exactly as whole, through `LLM.chat` on a tiny
gpt-oss with the real o200k vocabulary size. The vocabulary comes from the `harmony_vocab`
fixture (tests/conftest.py), offline."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxserve.harmony import Harmony, HarmonyText
from jaxserve.llm import LLM
from jaxserve.sampling_params import SamplingParams
from models.config import ModelConfig
from tests.engine_utils import tiny_engine_config, tiny_loaded_model

oh = pytest.importorskip("openai_harmony")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def harmony(harmony_vocab):
    return Harmony()


def package_rendering(encoding, *, effort: str, instructions: str | None, tools=(), turns=()) -> list[int]:
    """The conversation built with openai-harmony's own objects, as its README does."""
    system = oh.SystemContent.new().with_reasoning_effort(oh.ReasoningEffort(effort))
    messages = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system)]
    if instructions or tools:
        developer = oh.DeveloperContent.new()
        if instructions:
            developer = developer.with_instructions(instructions)
        if tools:
            developer = developer.with_function_tools(list(tools))
        messages.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER, developer))
    conversation = oh.Conversation.from_messages(messages + list(turns))
    return list(encoding.render_conversation_for_completion(conversation, oh.Role.ASSISTANT))


def test_rendered_prompt_equals_the_package_rendering(harmony):
    """System and developer messages become the developer instructions, reasoning effort the
    system message's, tools function tools; an earlier assistant turn's reasoning, call and tool
    result and answer render as the package renders them."""
    messages = [
        {"role": "system", "content": "Answer in French."},
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "reasoning_content": "I should call the tool.",
         "tool_calls": [{"id": "c1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"sky": "clear"}'},
        {"role": "assistant", "content": "Il fait beau."},
        {"role": "user", "content": "And tomorrow?"},
    ]
    got = harmony.render(messages, reasoning_effort="high", tools=[WEATHER])
    tool = oh.ToolDescription.new("get_weather", "Current weather in a city",
                                  parameters=WEATHER["function"]["parameters"])
    assistant = oh.Role.ASSISTANT
    turns = [
        oh.Message.from_role_and_content(oh.Role.USER, "Weather in Paris?"),
        oh.Message.from_role_and_content(assistant, "I should call the tool.").with_channel("analysis"),
        oh.Message.from_role_and_content(assistant, '{"city": "Paris"}').with_channel("commentary")
        .with_recipient("functions.get_weather").with_content_type("<|constrain|>json"),
        oh.Message.from_author_and_content(oh.Author.new(oh.Role.TOOL, "functions.get_weather"), '{"sky": "clear"}')
        .with_channel("commentary").with_recipient("assistant"),
        oh.Message.from_role_and_content(assistant, "Il fait beau.").with_channel("final"),
        oh.Message.from_role_and_content(oh.Role.USER, "And tomorrow?"),
    ]
    expected = package_rendering(harmony.encoding, effort="High", instructions="Answer in French.\n\nBe brief.",
                                 tools=[tool], turns=turns)
    assert got == expected
    text = harmony.encoding.decode_utf8(got)
    assert "Reasoning: high" in text and "Answer in French." in text and text.endswith("<|start|>assistant")
    assert "to=functions.get_weather" in text and "functions.get_weather to=assistant" in text
    # The plain case: the package's defaults (medium effort), no developer message.
    plain = harmony.render([{"role": "user", "content": "Hi"}])
    assert plain == package_rendering(harmony.encoding, effort="Medium", instructions=None,
                                      turns=[oh.Message.from_role_and_content(oh.Role.USER, "Hi")])


@pytest.mark.parametrize("bad, field", [
    ({"role": "robot", "content": "x"}, "messages[0].role"),
    ({"role": "user", "content": [{"type": "image_url", "image_url": {}}]}, "messages[0].content"),
    ({"role": "tool", "tool_call_id": "nope", "content": "x"}, "messages[0].tool_call_id"),
])
def test_bad_messages_name_the_field(harmony, bad, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        harmony.render([bad])
    with pytest.raises(ValueError, match="reasoning_effort"):
        harmony.render([{"role": "user", "content": "x"}], reasoning_effort="max")


def reply_tokens(encoding, *messages, end: str) -> list[int]:
    """An assistant reply as the model writes it after `<|start|>assistant`."""
    ids = []
    for message in messages:
        ids += encoding.render(message)
    ids = ids[2:]  # the prompt ended with <|start|>assistant
    end_id = encoding.encode(end, allowed_special="all")
    return ids[:-1] + end_id  # the last message ends the turn instead of <|end|>


def replies(encoding):
    assistant = oh.Role.ASSISTANT
    answer = reply_tokens(
        encoding,
        oh.Message.from_role_and_content(assistant, "The user greets; 2+2=4, reply “four”.").with_channel("analysis"),
        oh.Message.from_role_and_content(assistant, "Let me check. ").with_channel("commentary"),
        oh.Message.from_role_and_content(assistant, "It is **four** — 4 ✓.").with_channel("final"),
        end="<|return|>")
    call = reply_tokens(
        encoding,
        oh.Message.from_role_and_content(assistant, "Need the weather.").with_channel("analysis"),
        oh.Message.from_role_and_content(assistant, '{"city": "Zürich"}').with_channel("commentary")
        .with_recipient("functions.get_weather").with_content_type("<|constrain|>json"),
        end="<|call|>")
    return {"answer": answer, "call": call}


def test_whole_reply_splits_by_channel(harmony):
    split = harmony.parse(replies(harmony.encoding)["answer"])
    assert split == HarmonyText("The user greets; 2+2=4, reply “four”.", "Let me check. It is **four** — 4 ✓.", [])
    split = harmony.parse(replies(harmony.encoding)["call"])
    assert split.reasoning == "Need the weather." and split.content is None
    assert [(c.name, json.loads(c.arguments)) for c in split.calls] == [("get_weather", {"city": "Zürich"})]
    assert harmony.encoding.encode("<|return|>", allowed_special="all")[0] in harmony.stop_token_ids
    assert harmony.encoding.encode("<|call|>", allowed_special="all")[0] in harmony.stop_token_ids


@pytest.mark.parametrize("name", ["answer", "call"])
def test_streamed_reply_splits_exactly_as_whole(harmony, name):
    """Every chunk size, and random chunkings: the deltas add up to the whole split (multi-byte
    characters split across tokens included)."""
    tokens = replies(harmony.encoding)[name]
    whole = harmony.parse(tokens)
    rng = np.random.default_rng(0)
    chunkings = [[size] * len(tokens) for size in range(1, 8)]
    chunkings += [rng.integers(1, 6, len(tokens)).tolist() for _ in range(20)]
    for sizes in chunkings:
        stream, reasoning, content, calls, start = harmony.stream(), "", "", [], 0
        for size in sizes:
            if start >= len(tokens):
                break
            delta = stream.feed(tokens[start: start + size])
            start += size
            reasoning += delta.reasoning or ""
            content += delta.content or ""
            calls += delta.calls
        last = stream.finish()
        reasoning, content, calls = reasoning + (last.reasoning or ""), content + (last.content or ""), calls + last.calls
        assert (reasoning or None, content or None, calls) == (whole.reasoning, whole.content, whole.calls), sizes


def test_output_that_is_not_harmony_is_content(harmony):
    """A model that never opens a message: its text, special tokens dropped, is the content, at the end."""
    tokens = harmony.encoding.encode("just words", allowed_special="all")
    stream = harmony.stream()
    assert stream.feed(tokens) == HarmonyText()
    assert stream.finish().content == "just words"
    assert harmony.parse(tokens).content == "just words"


def tiny_gpt_oss() -> ModelConfig:
    """gpt-oss's o200k vocabulary size, everything else tiny."""
    return ModelConfig.from_hf(dict(
        architectures=["GptOssForCausalLM"], vocab_size=201088, hidden_size=16, intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_local_experts=2,
        num_experts_per_tok=1, max_position_embeddings=512, sliding_window=8, attention_bias=True,
        layer_types=["sliding_attention", "full_attention"], eos_token_id=200002, rms_norm_eps=1e-5))


def test_llm_chat_renders_with_harmony_and_splits_the_reply(harmony):
    """`LLM.chat` on a gpt-oss model: the prompt is the package's rendering (reasoning effort
    and instructions from the chat), the reply stops at <|return|> / <|call|>, and each
    completion's text and reasoning_content are the split of its tokens."""
    llm = LLM(config=tiny_engine_config(max_model_len=256), loaded=tiny_loaded_model(tiny_gpt_oss()))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=3, n=2)
    (out,) = llm.chat(messages, params, chat_template_kwargs={"reasoning_effort": "low"}, use_tqdm=False)
    assert out.prompt_token_ids == package_rendering(
        harmony.encoding, effort="Low", instructions="Be brief.",
        turns=[oh.Message.from_role_and_content(oh.Role.USER, "What is 2+2?")])
    for completion in out.outputs:
        split = harmony.parse(completion.token_ids)
        assert completion.text == (split.content or "") and completion.reasoning_content == split.reasoning
        stops = set(completion.token_ids) & set(harmony.stop_token_ids)
        assert not stops or completion.token_ids[-1] in harmony.stop_token_ids
    with pytest.raises(ValueError, match="chat_template_kwargs"):
        llm.chat(messages, params, chat_template_kwargs={"enable_thinking": True}, use_tqdm=False)
