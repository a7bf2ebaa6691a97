import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jaxserve.detokenizer import IncrementalDetokenizer
from jaxserve.sampling_params import SamplingParams
from jaxserve.stop_checker import OutputTracker

EOS = 0  # "<eos>", the only special token


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE with few merges, so CJK characters and emoji span several tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(
        ["hello world, the end.", "héllo there STOP here", "stop the world"] * 3, trainer)
    assert tokenizer.token_to_id("<eos>") == EOS
    return tokenizer


def encode(tokenizer, text):
    return tokenizer.encode(text).ids


def stream(tracker, token_ids):
    """Feed tokens one at a time; return the streamed deltas and the last finish."""
    deltas = []
    for token_id in token_ids:
        delta = tracker.add_tokens([token_id])
        deltas.append(delta.text)
        if delta.finish:
            break
    return deltas, tracker.finish


@pytest.mark.parametrize("text", ["héllo 你好 🙂 world", "🙂🙂x", "the end. 好"])
def test_utf8_spanning_tokens_is_never_split(tokenizer, text):
    ids = encode(tokenizer, text)
    assert len(ids) > len(text.split()) + 3, "multibyte characters should span tokens"
    for prompt in ([], encode(tokenizer, "hello 你")):
        detokenizer = IncrementalDetokenizer(tokenizer, prompt)
        deltas = [detokenizer.add_tokens([token_id]) for token_id in ids]
        assert all("\ufffd" not in delta for delta in deltas)
        assert "".join(deltas) == detokenizer.text == text
        assert detokenizer.token_ids == ids
        assert "" in deltas, "some token ends mid-character and must emit nothing"


def test_skip_special_tokens(tokenizer):
    ids = encode(tokenizer, "hello") + [EOS] + encode(tokenizer, " world")
    skipping = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    keeping = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False)
    assert "".join(skipping.add_tokens([i]) for i in ids) == "hello world"
    assert keeping.add_tokens(ids) == "hello<eos> world"


def test_stop_string_split_across_tokens_is_truncated(tokenizer):
    ids = encode(tokenizer, "the end.STOP here")
    assert "ST" in [tokenizer.id_to_token(i) for i in ids], "the stop string should span tokens"
    tracker = OutputTracker(tokenizer, [], SamplingParams(stop=["STOP"], max_tokens=50))
    deltas, finish = stream(tracker, ids)
    assert (finish.finish_reason, finish.stop_reason) == ("stop", "STOP")
    assert tracker.text == "the end." == "".join(deltas)
    assert all("S" not in delta for delta in deltas), "a possible stop prefix is held back"
    assert tracker.token_ids == ids[: len(tracker.token_ids)] and len(tracker.token_ids) < len(ids)
    # Tokens sampled after the finish (async scheduling runs one step ahead) are dropped.
    late = tracker.add_tokens(ids[-1:])
    assert late.token_ids == [] and late.text == "" and tracker.text == "the end."


def test_include_stop_str_in_output(tokenizer):
    params = SamplingParams(stop="STOP", include_stop_str_in_output=True, max_tokens=50)
    tracker = OutputTracker(tokenizer, [], params)
    deltas, finish = stream(tracker, encode(tokenizer, "the end.STOP here"))
    assert finish.stop_reason == "STOP"
    assert tracker.text == "the end.STOP" == "".join(deltas)


def test_multibyte_stop_string(tokenizer):
    tracker = OutputTracker(tokenizer, [], SamplingParams(stop=["好 🙂"], max_tokens=50))
    deltas, finish = stream(tracker, encode(tokenizer, "héllo 你好 🙂 world"))
    assert finish.stop_reason == "好 🙂" and tracker.text == "héllo 你" == "".join(deltas)


def test_held_back_text_is_released_when_no_stop_follows(tokenizer):
    tracker = OutputTracker(tokenizer, [], SamplingParams(stop=["STOP"], max_tokens=50))
    deltas, finish = stream(tracker, encode(tokenizer, "the end.ST"))
    assert finish is None and "".join(deltas) == "the end."
    delta = tracker.add_tokens(encode(tokenizer, "ring"))
    assert delta.text == "STring" and tracker.text == "the end.STring"


def test_earliest_stop_string_wins(tokenizer):
    tracker = OutputTracker(tokenizer, [], SamplingParams(stop=["world", "end"], max_tokens=50))
    tracker.add_tokens(encode(tokenizer, "the end. hello world"))
    assert tracker.finish.stop_reason == "end" and tracker.text == "the "


def test_stop_token_ids_and_eos(tokenizer):
    body = encode(tokenizer, "hello world")
    stop_id = body[1]
    tracker = OutputTracker(tokenizer, [], SamplingParams(stop_token_ids=[stop_id]),
                            eos_token_ids=[EOS])
    delta = tracker.add_tokens(body + [EOS])
    assert delta.token_ids == body[:2], "the stop token stays in the output"
    assert (delta.finish.finish_reason, delta.finish.stop_reason) == ("stop", stop_id)

    tracker = OutputTracker(tokenizer, [], SamplingParams(), eos_token_ids=[EOS])
    delta = tracker.add_tokens(body + [EOS] + body)
    assert delta.token_ids == body + [EOS] and tracker.text == "hello world"
    assert (delta.finish.finish_reason, delta.finish.stop_reason) == ("stop", None)

    tracker = OutputTracker(tokenizer, [], SamplingParams(ignore_eos=True, max_tokens=50),
                            eos_token_ids=[EOS])
    assert tracker.add_tokens(body + [EOS] + body).finish is None


def test_min_tokens_delays_every_stop(tokenizer):
    body = encode(tokenizer, "the end.STOP")
    params = SamplingParams(min_tokens=len(body) + 1, stop=["end"], max_tokens=50)
    tracker = OutputTracker(tokenizer, [], params, eos_token_ids=[EOS])
    assert tracker.add_tokens(body + [EOS]).finish is None
    delta = tracker.add_tokens([EOS])
    assert delta.finish.finish_reason == "stop" and len(tracker.token_ids) == len(body) + 2


def test_length_limits(tokenizer):
    ids = encode(tokenizer, "hello world, the end.")
    tracker = OutputTracker(tokenizer, [], SamplingParams(max_tokens=3))
    delta = tracker.add_tokens(ids)
    assert delta.finish.finish_reason == "length" and len(tracker.token_ids) == 3
    assert tracker.text == tokenizer.decode(ids[:3])

    prompt = encode(tokenizer, "stop the world")
    tracker = OutputTracker(tokenizer, prompt, SamplingParams(max_tokens=None),
                            max_model_len=len(prompt) + 2)
    assert tracker.add_tokens(ids).finish.finish_reason == "length"
    assert len(tracker.token_ids) == 2

    # As in vLLM, EOS as the last allowed token reports "length".
    tracker = OutputTracker(tokenizer, [], SamplingParams(max_tokens=2), eos_token_ids=[EOS])
    assert tracker.add_tokens([ids[0], EOS]).finish.finish_reason == "length"


def test_abort_flushes_held_text(tokenizer):
    tracker = OutputTracker(tokenizer, [], SamplingParams(stop=["STOP"], max_tokens=50))
    assert tracker.add_tokens(encode(tokenizer, "the end.ST")).text == "the end."
    delta = tracker.abort()
    assert delta.finish.finish_reason == "abort" and delta.text == "ST"
