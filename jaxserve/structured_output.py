"""Structured outputs: llguidance grammars, one matcher per completion, token masks per step.

A request's `StructuredOutputsParams` compiles to an llguidance grammar when the request is checked
(`EngineCore.check_inputs`, on a front end's worker thread): a constraint llguidance rejects is a
ValueError naming its field, before anything is admitted. Compiled grammars are cached by their
text (a bounded LRU), as a matcher in its start state that each completion deep-copies.

On the engine thread, every constrained completion (each child of `n > 1`) owns a matcher:

- before a step is dispatched, `fill_bitmask` writes the allowed next tokens of the step's
  constrained sampling rows into the sampler's `token_bitmask` (jaxserve/sampler.py applies it on
  device); every other row keeps -1, "allow all";
- when a step's tokens reach the host, `advance` feeds each constrained completion its token. The
  verdict says whether the completion goes on, is complete (the grammar accepts nothing but EOS:
  it ends now with finish_reason "stop", no EOS step needed) or was handed a token its grammar
  rejects (the engine logs it and ends that completion alone with "stop").

A matcher lives as long as its completion, through preemption (the recompute re-feeds the KV
cache, not the grammar). The mask of a step needs the matcher to have seen the row's previous
token, so the engine waits for the tokens of the step in flight before dispatching one with a
constrained row whose last token is still on the device (jaxserve/engine.py, BUILD.md
"Structured outputs").

JSON is compact (no whitespace between tokens, `,` and `:` separators): the shortest valid text,
and a sampled reply cannot run on in whitespace until `max_tokens`.
"""

from __future__ import annotations

import collections
import enum
import importlib
import json
import logging
import threading
import time
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

import numpy as np

from jaxserve.json_object import json_object
from jaxserve.sampling_params import StructuredOutputsParams

if TYPE_CHECKING:
    import llguidance

logger = logging.getLogger("jaxserve.structured_output")

_JSON_OPTIONS = {"whitespace_flexible": False}


def _llguidance():
    """llguidance, imported on the first constrained request: an engine that never sees one runs
    without it (a ValueError says what is missing if it is not installed)."""
    try:
        importlib.import_module("llguidance.numpy")
        return importlib.import_module("llguidance")
    except ImportError as err:
        raise ValueError(f"structured_outputs needs the package llguidance (pip install llguidance): {err}") from None


class Verdict(enum.Enum):
    """What a sampled token did to its completion's grammar."""

    CONTINUE = "continue"  # accepted; more may follow
    COMPLETE = "complete"  # accepted, and the grammar allows nothing more (but EOS)
    REJECTED = "rejected"  # the grammar does not allow it (the matcher is in error)


def grammar_source(params: StructuredOutputsParams) -> tuple[str, str]:
    """(field, llguidance grammar) for the constraint; ValueError naming the field when its text
    is malformed before llguidance even sees it (a schema that is not JSON)."""
    kind = params.kind
    llg = _llguidance()
    if kind == "json":
        return kind, _from_json_schema(kind, json_object(params.json, "structured_outputs.json"))
    if kind == "json_object":
        return kind, _from_json_schema(kind, {"type": "object"})
    if kind == "regex":
        return kind, llg.LLMatcher.grammar_from_regex(params.regex)
    if kind == "choice":
        # One Lark string literal per choice: JSON's escapes are Lark's.
        return kind, llg.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(choice) for choice in params.choice))
    try:  # "grammar": Lark (llguidance's dialect), or GBNF, which llguidance converts
        return kind, llg.grammar_from("grammar", params.grammar)
    except ValueError as err:
        raise ValueError(f"structured_outputs.grammar: {err}") from None


def _from_json_schema(kind: str, schema) -> str:
    try:
        return _llguidance().LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
    except ValueError as err:
        raise ValueError(f"structured_outputs.{kind}: {err}") from None


class _DecodedVocabulary:
    """A vocabulary llguidance reads as bytes, for tokenizers its own loader does not know (e.g.
    word-level test tokenizers): each token's bytes are its decoded text, and text is tokenized by
    greedy longest match. Only a stand-in: such a vocabulary lacks single-byte tokens, so grammars
    that force a prefix mask everything but EOS."""

    def __init__(self, hf, vocab_size: int, eos_token_ids: Sequence[int]):
        specials = {token.content for token in hf.get_added_tokens_decoder().values() if token.special}
        num_known = min(vocab_size, hf.get_vocab_size(with_added_tokens=True))
        self.tokens = [hf.decode([i], skip_special_tokens=False).encode() for i in range(num_known)]
        self.tokens += [b""] * (vocab_size - num_known)
        self.special_token_ids = [i for i in range(num_known) if hf.id_to_token(i) in specials]
        self.eos_token_id = eos_token_ids[0]
        self.bos_token_id = None
        special = set(self.special_token_ids) | set(eos_token_ids)
        self._ids = {t: i for i, t in enumerate(self.tokens) if t and i not in special}
        self._longest = max(map(len, self._ids), default=1)

    def __call__(self, text: bytes) -> list[int]:
        ids, start = [], 0
        while start < len(text):
            for length in range(min(self._longest, len(text) - start), 0, -1):
                token = self._ids.get(text[start: start + length])
                if token is not None:
                    ids.append(token)
                    start += length
                    break
            else:
                start += 1  # a byte no token spells
        return ids


def ll_tokenizer(tokenizer, vocab_size: int, eos_token_ids: Collection[int]) -> llguidance.LLTokenizer:
    """llguidance's view of the engine's tokenizer (models/tokenizer.py; its `hf` is a
    `tokenizers.Tokenizer`) over the model's `vocab_size` ids (ids the tokenizer lacks are never
    allowed), ending on the engine's EOS ids."""
    llg = _llguidance()
    eos = sorted(eos_token_ids)
    num_ids = max(vocab_size, tokenizer.hf.get_vocab_size(with_added_tokens=True))
    try:
        return llg.LLTokenizer(tokenizer.hf.to_str(), n_vocab=num_ids, eos_token=eos)
    except ValueError as err:  # a tokenizer llguidance cannot read from its JSON
        logger.info("llguidance cannot read the tokenizer (%s); using its decoded tokens", err)
        wrapper = llg.TokenizerWrapper(_DecodedVocabulary(tokenizer.hf, num_ids, eos))
        return llg.LLTokenizer(wrapper, n_vocab=num_ids, eos_token=eos)


class StructuredOutputs:
    """The engine's structured outputs: compiled grammars, live matchers, and step masks.

    `compile` is safe on any thread; everything else runs on the engine thread. `vocab_size` is the
    model's: masks are `ceil(vocab_size / 32)` words wide, the sampler's `token_bitmask` rows.
    """

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Collection[int], cache_size: int = 256):
        self.vocab_size = vocab_size
        self._tokenizer_args = (tokenizer, vocab_size, tuple(eos_token_ids))
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[tuple[str, str], llguidance.LLMatcher] = collections.OrderedDict()
        self._cache_size = cache_size
        self._executor: llguidance.LLExecutor | None = None
        self.matchers: dict[str, llguidance.LLMatcher] = {}
        # Accounting (benchmarks, BUILD.md): host time spent filling masks, steps and rows filled,
        # and steps dispatched only after the step in flight was processed (the engine counts).
        self.fill_seconds = 0.0
        self.num_waits = 0
        self.num_filled_steps = 0
        self.num_filled_rows = 0

    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:  # built once, on first use (~0.2 s for a 49k vocabulary)
            if self._ll_tokenizer is None:
                self._ll_tokenizer = ll_tokenizer(*self._tokenizer_args)
            return self._ll_tokenizer

    def compile(self, params: StructuredOutputsParams) -> llguidance.LLMatcher:
        """The constraint's matcher in its start state (cached by grammar text); ValueError naming
        the field when llguidance cannot compile it."""
        kind, grammar = grammar_source(params)
        key = (kind, grammar)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        matcher = _llguidance().LLMatcher(self.tokenizer(), grammar, log_level=0)  # drops the GIL
        if matcher.is_error():
            raise ValueError(f"structured_outputs.{kind}: {matcher.get_error().strip()}")
        with self._lock:
            self._cache[key] = matcher
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return matcher

    # ---- completions (engine thread) ----

    def add(self, completion_id: str, params: StructuredOutputsParams) -> None:
        """Start constraining `completion_id` (a child request id)."""
        self.matchers[completion_id] = self.compile(params).deep_copy()

    def remove(self, completion_id: str) -> None:
        self.matchers.pop(completion_id, None)

    def is_constrained(self, completion_id: str) -> bool:
        return completion_id in self.matchers

    def advance(self, completion_id: str, token_id: int) -> Verdict:
        """Feed a sampled token to the completion's matcher (unconstrained: CONTINUE)."""
        matcher = self.matchers.get(completion_id)
        if matcher is None:
            return Verdict.CONTINUE
        if not matcher.consume_token(token_id):
            logger.error("request %s: token %d breaks its structured-output grammar (%s); ending it",
                         completion_id, token_id, (matcher.get_error().strip().splitlines() or [""])[0])
            return Verdict.REJECTED
        return Verdict.COMPLETE if matcher.is_stopped() else Verdict.CONTINUE

    def fill_bitmask(self, bitmask: np.ndarray, rows: Sequence[tuple[int, str]]) -> None:
        """Write the allowed next tokens of the constrained ones among `rows` ((row, completion
        id): rows that sample this step) into `bitmask [R, W] i32`; other rows are left as they
        are (-1: allow all), and so are those whose grammar is complete or broken: their
        completion ends when the step before is processed, and this row's token is dropped."""
        targets = [(self.matchers[cid], row) for row, cid in rows
                   if cid in self.matchers and not self.matchers[cid].is_stopped()]
        if not targets:
            return
        start = time.perf_counter()
        num_words = -(-self.tokenizer().vocab_size // 32)
        scratch = bitmask if bitmask.shape[1] == num_words else np.full((len(bitmask), num_words), -1, np.int32)
        llg = _llguidance()
        if self._executor is None:
            self._executor = llg.LLExecutor()
        llg.numpy.fill_next_token_bitmask_par(self._executor, targets, scratch)
        if scratch is not bitmask:  # llguidance counts more ids than the model has: drop those
            bitmask[:, :] = scratch[:, : bitmask.shape[1]]
        self.fill_seconds += time.perf_counter() - start
        self.num_filled_steps += 1
        self.num_filled_rows += len(targets)
