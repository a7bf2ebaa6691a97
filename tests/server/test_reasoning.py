"""`<think>` reasoning split from content, whole and streamed: equal under every chunking."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.openai.reasoning import (REASONING_PARSERS, ReasoningParser, ReasoningStream,
                                     choose_reasoning_parser)
from tests.server.test_tool_parsers import chunkings

# (model output, opened, reasoning, content)
CASES = {
    "qwen3 thinking": (
        "<think>\nThe user asks 2+2. That is 4.\n</think>\n\nThe answer is 4.", None,
        "The user asks 2+2. That is 4.", "The answer is 4."),
    "deepseek-r1, <think> in the prompt": (
        "Okay, 2+2 is 4 < 5 </thin.\n</think>\n\n**4**", None, "Okay, 2+2 is 4 < 5 </thin.", "**4**"),
    "prompt opened, known": (
        "Hmm, 4.\n</think>\n\n4", True, "Hmm, 4.", "4"),
    "prompt opened, thinking cut short": (
        "Let me think about this carefully\n\n", True, "Let me think about this carefully", ""),
    "thinking cut short": ("  <think>\nStill thinking...", None, "Still thinking...", ""),
    "empty thinking (qwen3 non-thinking)": ("<think>\n\n</think>\n\nHello!", None, None, "Hello!"),
    "no reasoning": ("Hello! <b>4</b>\n", None, None, "Hello! <b>4</b>\n"),
    "no reasoning, known": ("Hello </think> there", False, None, "Hello </think> there"),
    "opened unknown, plain text": ("  <thin and more", None, None, "  <thin and more"),
    "tag repeated in content": (
        "<think>a</think>b <think>c</think>", None, "a", "b <think>c</think>"),
    "unicode": ("<think>日本語 🚀\n</think>\n答え", False, "日本語 🚀", "答え"),
    "empty": ("", None, None, ""),
    "whitespace only, opened": (" \n ", True, None, ""),
}


def _streamed(stream: ReasoningStream, chunks: list[str]) -> tuple[str | None, str]:
    pieces = [stream.feed(chunk) for chunk in chunks] + [stream.finish()]
    reasoning = "".join(r for r, _ in pieces if r is not None)
    return reasoning or None, "".join(c for _, c in pieces if c is not None)


@pytest.mark.parametrize("case", CASES)
def test_split(case):
    text, opened, reasoning, content = CASES[case]
    assert ReasoningParser().split(text, opened=opened) == (reasoning, content)


@pytest.mark.parametrize("case", CASES)
def test_streamed_equals_split_for_every_chunking(case):
    text, opened, reasoning, content = CASES[case]
    for chunks in chunkings(text, random.Random(case), count=40):
        assert _streamed(ReasoningParser().stream(opened=opened), chunks) == (reasoning, content), chunks


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(st.sampled_from(["<think>", "</think>", "<", "</", "think>", " ", "\n", "a",
                                        "<thi", "nk>", "é"]), max_size=25),
       opened=st.sampled_from([None, True, False]), data=st.data())
def test_any_text_streams_like_it_splits(pieces, opened, data):
    text = "".join(pieces)
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=10).map(sorted))
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    parser = ReasoningParser()
    assert _streamed(parser.stream(opened=opened), chunks) == parser.split(text, opened=opened)


def test_stream_holds_only_what_is_undecided():
    opened = ReasoningParser().stream(opened=True)
    assert opened.feed("Thinking") == ("Thinking", None)
    assert opened.feed(" hard </thi") == (" hard", None)  # " </thi" waits: a tag, a space to drop?
    assert opened.feed("nk>\n\nDone") == (None, "Done")
    assert opened.finish() == (None, None)
    unknown = ReasoningParser().stream()
    assert unknown.feed("Thinking") == (None, None)  # reasoning or content: decided by </think>
    assert unknown.feed("</think>Done") == ("Thinking", "Done")
    tagged = ReasoningParser().stream()
    assert tagged.feed("<thi") == (None, None)
    assert tagged.feed("nk>Hm") == ("Hm", None)
    with pytest.raises(ValueError, match="finish"):
        (tagged.finish(), tagged.feed("x"))


def test_opened_by_the_prompt():
    parser = ReasoningParser()
    assert parser.opened_by("<|im_start|>assistant\n<think>\n")
    assert not parser.opened_by("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not parser.opened_by("<|im_start|>assistant\n")


def test_custom_tags_and_choice():
    parser = ReasoningParser("<reasoning>", "</reasoning>")
    assert parser.split("<reasoning>x</reasoning>y") == ("x", "y")
    with pytest.raises(ValueError, match="reasoning tags must be non-empty"):
        ReasoningParser("", "</think>")
    assert choose_reasoning_parser(None) is None
    assert all(choose_reasoning_parser(name) is ReasoningParser for name in REASONING_PARSERS)
    with pytest.raises(ValueError, match=r"reasoning_parser must be one of think, .*got 'r1'"):
        choose_reasoning_parser("r1")
