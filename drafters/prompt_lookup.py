"""Prompt lookup: draft what followed earlier occurrences of the context's last n-gram.

Model-free and host-side. With ``max_branches > 1`` the continuations after
several distinct earlier matches are merged into one tree (a trie), so
different guesses share their common prefix.
"""

from __future__ import annotations

from typing import Hashable, Sequence

import numpy as np

from specjax.drafters.base import HostDrafter, Proposal


class PromptLookupDrafter(HostDrafter):
    """n-gram matching in the request's own context (prompt + output so far).

    ``probs[i]``: the share of the merged continuations that pass through node i (a path
    probability). Keeps nothing between requests, so one instance may serve several engines.
    """

    learns_across_requests = False

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, max_branches: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram ({min_ngram}) <= max_ngram ({max_ngram})")
        if max_branches < 1:
            raise ValueError(f"max_branches must be >= 1, got {max_branches}")
        self.max_ngram, self.min_ngram, self.max_branches = max_ngram, min_ngram, max_branches
        self._contexts: dict[Hashable, list[int]] = {}

    def start_request(self, request_id: Hashable, prompt_ids: Sequence[int]) -> None:
        self._contexts[request_id] = [int(t) for t in prompt_ids]

    def observe(self, request_id: Hashable, accepted_ids: Sequence[int]) -> None:
        self._contexts[request_id].extend(int(t) for t in accepted_ids)

    def stop_request(self, request_id: Hashable) -> None:
        self._contexts.pop(request_id, None)

    def propose(self, request_id: Hashable, max_tokens: int) -> Proposal:
        context = np.asarray(self._contexts[request_id], np.int64)
        for n in range(min(self.max_ngram, len(context) - 1), self.min_ngram - 1, -1):
            starts = _match_ends(context, n)
            if len(starts):
                continuations = [context[s: s + max_tokens] for s in starts[::-1][: self.max_branches]]
                return _trie(continuations, max_tokens, match_len=n)
        return Proposal.empty()


def _match_ends(context: np.ndarray, n: int) -> np.ndarray:
    """Positions just after each earlier occurrence of the last n tokens (oldest first)."""
    suffix = context[-n:]
    windows = np.lib.stride_tricks.sliding_window_view(context[:-1], n)
    hits = np.flatnonzero((windows == suffix).all(axis=1))
    return hits + n


def _trie(continuations: list[np.ndarray], max_tokens: int, match_len: int) -> Proposal:
    """Merge continuations (most recent first) into a tree of at most max_tokens nodes."""
    tokens: list[int] = []
    parents: list[int] = []
    counts: list[int] = []
    children: dict[tuple[int, int], int] = {}
    for cont in continuations:
        node = -1
        for tok in cont.tolist():
            key = (node, tok)
            if key not in children:
                if len(tokens) == max_tokens:
                    break
                children[key] = len(tokens)
                tokens.append(tok)
                parents.append(node)
                counts.append(0)
            node = children[key]
            counts[node] += 1
    total = len(continuations)
    probs = np.asarray(counts, np.float32) / max(total, 1)
    return Proposal(np.asarray(tokens, np.int32), np.asarray(parents, np.int32), probs,
                    score=float(probs.sum()), match_len=match_len)
