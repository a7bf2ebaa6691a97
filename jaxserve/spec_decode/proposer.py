"""The proposer interface, and the n-gram proposer (prompt lookup).

A proposer sits beside the KV connector: after a step's tokens reach the host, the engine asks
it for each running request's next drafts. It gets the request's accepted tokens (and, for
model-based methods, the target's hidden states: `Proposer.needs_hidden_states`) and returns up
to `max_drafts` tokens per request; a sampled method also returns the probability `q` its draft
was drawn from, which the verifier needs for exact rejection sampling (one-hot drafts, like the
n-gram's, pass None: `q(draft) = 1`).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Sequence

import numpy as np

from jaxserve.spec_decode.config import SpeculativeConfig


@dataclasses.dataclass
class Proposal:
    """Drafts of one request: at most k token ids, and (sampled methods) `probs [len, V]`, the
    distribution each was drawn from; None for a deterministic proposer."""

    token_ids: list[int]
    probs: np.ndarray | None = None


class Proposer(abc.ABC):
    needs_hidden_states = False

    def __init__(self, config: SpeculativeConfig):
        self.config = config
        self.num_speculative_tokens = config.num_speculative_tokens

    @abc.abstractmethod
    def propose(self, token_ids: Sequence[int], max_drafts: int, hidden_states=None) -> Proposal:
        """Drafts to follow `token_ids` (the request's prompt and accepted output), at most
        `max_drafts` (<= k)."""

    def propose_batch(self, requests: Sequence[tuple[Sequence[int], int]]) -> list[Proposal]:
        """`propose` for several (token ids, max drafts) at once; a model-based proposer batches them."""
        return [self.propose(token_ids, max_drafts) for token_ids, max_drafts in requests]


class NgramProposer(Proposer):
    """Prompt lookup (vLLM's "ngram"): find the longest suffix of the request's tokens, from
    `prompt_lookup_max` down to `prompt_lookup_min` tokens, that occurred before; propose the
    tokens that followed its most recent earlier occurrence. On the host, no model."""

    def propose(self, token_ids: Sequence[int], max_drafts: int, hidden_states=None) -> Proposal:
        k = min(max_drafts, self.num_speculative_tokens)
        if k <= 0:
            return Proposal([])
        return Proposal(ngram_lookup(np.asarray(token_ids, np.int64), self.config.prompt_lookup_min,
                                     self.config.prompt_lookup_max, k))


def ngram_lookup(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> list[int]:
    """Up to k tokens following the most recent earlier occurrence of the longest suffix of
    `tokens` of length in [min_n, max_n]; [] when none occurs."""
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        # Windows starting at 0 .. length - 1 - n: each ends before the suffix's last token.
        windows = np.lib.stride_tricks.sliding_window_view(tokens[: length - 1], n)
        hits = np.flatnonzero((windows == tokens[length - n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start: start + k].tolist()
    return []
