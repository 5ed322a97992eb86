"""The public API: ``Engine(target, drafter).generate(prompts, ...)``.

The loop: prefill, then per step the host drafter proposes one tree per active
sequence, ``verify`` scores all trees in one target pass, ``accept`` keeps the
longest agreed path plus a bonus token, and the host reads back only the
emitted tokens to feed the drafter. Sequences in a batch accept different
numbers of tokens per step; finished ones ride along masked.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from specjax.drafters.base import HostDrafter
from specjax.engine.plain import pad_prompts
from specjax.engine.sampling import Sampling
from specjax.engine.steps import accept, prefill, verify
from specjax.engine.tree import DraftTree, validate_tree
from specjax.models.loading import Model
from specjax.models.sharding import DATA, cache_sharding, shard_params

Prompt = Union[str, Sequence[int]]


@dataclasses.dataclass
class GenerationResult:
    """One request's output and what it cost."""

    token_ids: list[int]
    text: Optional[str]
    target_passes: int  # prefill counts as one
    accepted_draft_tokens: int
    draft_s: float
    verify_s: float
    wall_s: float

    @property
    def tokens_per_pass(self) -> float:
        return len(self.token_ids) / max(self.target_passes, 1)

    @property
    def mean_accepted(self) -> float:
        """Draft tokens accepted per speculative pass (excludes prefill and bonus tokens)."""
        return self.accepted_draft_tokens / max(self.target_passes - 1, 1)


class Engine:
    """Speculative decoding with a target model and a host drafter (or none).

    Args:
      target: the loaded target ``Model``.
      drafter: a ``HostDrafter`` (prompt lookup, suffix index, ...) or None for
        plain decoding through the same loop (one token per pass).
      draft_capacity: T, the fixed number of tree slots per sequence and step.
      attention: "auto" | "xla" | "pallas" (see ``specjax.tpu_kernels``).
      max_batch_size: prompts are processed in batches of at most this size.
      mesh: a ("data", "model") ``jax.sharding.Mesh``: the target is tensor-parallel
        over "model" (see ``specjax.models.sharding``), the batch split over "data".
    """

    def __init__(self, target: Model, drafter: Optional[HostDrafter] = None, *, draft_capacity: int = 16,
                 attention: str = "auto", max_batch_size: int = 16, mesh: Optional[Mesh] = None):
        if draft_capacity < 0:
            raise ValueError(f"draft_capacity must be >= 0, got {draft_capacity}")
        if mesh is not None:
            target = dataclasses.replace(target, params=shard_params(target.params, target.config, mesh))
        self.mesh = mesh
        self.target = target
        self.drafter = drafter
        self.capacity = draft_capacity if drafter is not None else 0
        self.attention = attention
        self.max_batch_size = max_batch_size
        self._request_ids = itertools.count()

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.target.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as lists of token ids")
            return list(self.target.tokenizer.encode(prompt).ids)
        return [int(t) for t in prompt]

    def decode(self, ids: Sequence[int]) -> Optional[str]:
        return None if self.target.tokenizer is None else self.target.tokenizer.decode(list(ids))

    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int = 128, *, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int = 0, stop: Sequence[str] = (),
                 progress=None) -> list[GenerationResult]:
        """Generate for every prompt; greedy output equals plain greedy decoding exactly.

        ``stop`` strings end a request once its decoded text contains one (the
        text is cut before it). ``progress`` is an optional tqdm-like object
        whose ``update(n)`` is called with the number of new tokens.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        sampling = Sampling(temperature, top_k, top_p)
        encoded = [self.encode(p) for p in prompts]
        results: list[GenerationResult] = []
        for start in range(0, len(encoded), self.max_batch_size):
            batch = encoded[start: start + self.max_batch_size]
            results.extend(self._generate_batch(batch, max_new_tokens, sampling, seed + start, tuple(stop),
                                                progress))
        return results

    def _max_len(self, prompt_width: int, max_new_tokens: int) -> int:
        needed = prompt_width + max_new_tokens + self.capacity + 1
        limit = self.target.config.max_position_embeddings
        if prompt_width + max_new_tokens > limit:
            raise ValueError(f"prompt ({prompt_width} tokens, padded) + max_new_tokens ({max_new_tokens}) "
                             f"exceeds the model's max_position_embeddings ({limit})")
        return int(-(-needed // 128) * 128)

    def _generate_batch(self, prompts, max_new_tokens, sampling, seed, stop, progress):
        cfg, params = self.target.config, self.target.params
        t0 = time.perf_counter()
        n_requests = len(prompts)
        prompts = self._pad_batch(prompts)
        tokens, lengths = pad_prompts(prompts, cfg.vocab_size)
        b = len(prompts)
        budget = jnp.full(b, max_new_tokens, jnp.int32)
        state, first = prefill(params, cfg, jnp.asarray(tokens), jnp.asarray(lengths), budget,
                               jax.random.key(seed), sampling=sampling,
                               max_len=self._max_len(tokens.shape[1], max_new_tokens), attention=self.attention,
                               cache_sharding=None if self.mesh is None else cache_sharding(cfg, self.mesh, b))
        outputs = [[int(t)] for t in np.asarray(first)]
        finished = np.asarray(state.finished).copy()
        finished[n_requests:] = True  # rows that only pad the batch to the data axis
        passes = np.ones(b, np.int64)
        accepted = np.zeros(b, np.int64)
        draft_s = np.zeros(b)
        verify_s = np.zeros(b)
        rids = [next(self._request_ids) for _ in range(b)]
        if self.drafter is not None:
            for rid, prompt, out in zip(rids[:n_requests], prompts, outputs):
                self.drafter.start_request(rid, prompt)
                self.drafter.observe(rid, out)
        finished |= self._apply_stop_strings(outputs, stop)
        self._report(progress, b)
        while not finished.all():
            active = ~finished
            d0 = time.perf_counter()
            tree = self._draft(rids, active)
            d1 = time.perf_counter()
            state = state.replace(finished=jnp.asarray(finished))
            state, logits, _ = verify(params, state, tree, cfg=cfg, attention=self.attention)
            state, acc = accept(state, tree, logits, sampling=sampling, eos_ids=cfg.eos_token_ids)
            emitted, num, n_draft, device_finished = jax.device_get(
                (acc.tokens, acc.num, acc.num_draft_accepted, state.finished))
            d2 = time.perf_counter()
            draft_s[active] += (d1 - d0) / active.sum()
            verify_s[active] += (d2 - d1) / active.sum()
            passes[active] += 1
            accepted += n_draft
            for i in np.flatnonzero(active):
                new = emitted[i, : num[i]].tolist()
                outputs[i].extend(new)
                if self.drafter is not None:
                    self.drafter.observe(rids[i], new)
            self._report(progress, int(num.sum()))
            finished = device_finished | self._apply_stop_strings(outputs, stop)
        if self.drafter is not None:
            for rid in rids[:n_requests]:
                self.drafter.stop_request(rid)
        wall = time.perf_counter() - t0
        outputs = self._cut_stops(outputs[:n_requests], stop)
        return [GenerationResult(out, self.decode(out), int(passes[i]), int(accepted[i]), float(draft_s[i]),
                                 float(verify_s[i]), wall) for i, out in enumerate(outputs)]

    def _pad_batch(self, prompts: list) -> list:
        """Repeat the last prompt so the batch divides the mesh's data axis."""
        if self.mesh is None:
            return prompts
        extra = -len(prompts) % self.mesh.shape[DATA]
        return list(prompts) + [prompts[-1]] * extra

    def _draft(self, rids, active) -> DraftTree:
        b, t = len(rids), self.capacity
        tokens = np.zeros((b, t), np.int32)
        parents = np.full((b, t), -1, np.int32)
        valid = np.zeros((b, t), bool)
        for i in np.flatnonzero(active) if self.drafter is not None else ():
            prop = self.drafter.propose(rids[i], t)
            n = len(prop)
            tokens[i, :n], parents[i, :n], valid[i, :n] = prop.tokens, prop.parents, True
        tree = DraftTree(tokens, parents, valid)
        validate_tree(tree, self.target.config.vocab_size)
        return tree

    def _apply_stop_strings(self, outputs, stop) -> np.ndarray:
        if not stop or self.target.tokenizer is None:
            return np.zeros(len(outputs), bool)
        return np.array([any(s in self.decode(o) for s in stop) for o in outputs])

    def _cut_stops(self, outputs, stop):
        """Drop tokens from the first one whose text completes a stop string."""
        if not stop or self.target.tokenizer is None:
            return outputs
        cut = []
        for out in outputs:
            end = next((k for k in range(1, len(out) + 1) if any(s in self.decode(out[:k]) for s in stop)), None)
            cut.append(out if end is None else out[:end])
        return cut

    @staticmethod
    def _report(progress, n: int) -> None:
        if progress is not None:
            progress.update(n)
