"""HierSpec (SpecMQuant's hierarchical speculation): a top drafter drafts for an intermediate model,
the intermediate verifies those trees against itself until its accepted chain is long enough, and
the target verifies that chain.

Why: on a quantized (memory-cheap) target, verifying a wide tree costs far more than a one-token
step, while a chain costs about one step. A cheap top drafter (Token Recycling, a small draft
model) proposes trees for a mid-sized intermediate model; the intermediate's accepted chain is
close to what the target would say, so the target gets a long, likely chain for the price of a
chain verify.

One ``propose`` runs rounds in a ``lax.while_loop``: the top proposes a tree from the
intermediate's root, ``step_impl`` (the engine's own verify + accept, on the intermediate's own
``DecodeState``) accepts its path and bonus, the top is updated with that step, and the emitted
tokens extend the chain. Rows stop once their chain holds ``min_draft_length`` tokens or the
intermediate emits an end-of-sequence token; at most ``max_rounds`` rounds run (the default,
``min_draft_length``, always reaches the length: a round emits at least one token). Rows whose
last step emitted nothing (the target has finished them) run no rounds. The chain
(at most ``capacity`` tokens) goes to the target as a point-mass chain: greedy rows get the
intermediate's own argmax path; sampled rows get a sample of the intermediate's distribution,
and point-mass verification is lossless for any draft drawn independently of the target's
randomness (whatever the acceptance rule reads from q, none is needed).

State between steps: the intermediate's cache holds the target's context (``lengths`` = the
target's, the root not yet cached) and the top drafter follows the intermediate's context.
After a propose the intermediate has cached the root and the first chain tokens; ``update``
keeps the accepted prefix (feeding the one chain token it has not cached when the target accepts
the whole chain) and rewinds the top drafter to the target's context: Token Recycling needs only
the new root, a draft model is rewound to the accepted length and fed the bonus token.

Supported tops: Token Recycling and a draft model (chain or tree). EAGLE-3 heads need the
intermediate's hidden states at the rewound position, and host drafters (suffix, prompt lookup)
propose on the host, between device steps, not inside a jitted round loop: neither is a top here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax

from specjax.drafters.device import KeyedByConfig, scan_chunks
from specjax.drafters.draft_model import DraftModelDrafter, VocabMismatchError
from specjax.drafters.token_recycling import TokenRecyclingDrafter
from specjax.engine.sampling import SamplingParams
from specjax.engine.state import DecodeState
from specjax.engine.steps import PREFILL_CHUNK, Accepted, StepAux, step_impl
from specjax.engine.tree import DraftTree
from specjax.models.decoder import KVCache, causal_mask, forward_hidden
from specjax.models.loading import Model

SUPPORTED_TOPS = (TokenRecyclingDrafter, DraftModelDrafter)
_NO_BUDGET = 2 ** 30  # the intermediate's own token budget: the target's budget governs


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HierarchicalState:
    inter: DecodeState  # the intermediate's own decoding state (its cache, lengths, root)
    top: Any  # the top drafter's state, following the intermediate's context
    base: jax.Array  # int32[B] the target's cache length when the last propose started
    idle: jax.Array  # bool[B] the last step emitted nothing (the target has finished the row): no rounds
    inter_passes: jax.Array  # int32[B] intermediate verify passes run for each row (a cost statistic)


@dataclasses.dataclass(eq=False)
class HierarchicalDrafter(KeyedByConfig):
    """The intermediate model verifies the top drafter's trees until its chain reaches
    ``min_draft_length`` tokens; the target verifies that chain.

    Args:
      intermediate: a loaded ``Model`` sharing the target's vocabulary (quantized or not).
      top: a device drafter *for the intermediate*: ``TokenRecyclingDrafter`` or ``DraftModelDrafter``.
      target_vocab_size: the target's vocabulary size (checked against both).
      min_draft_length: chain tokens a row collects before the target verifies (fewer only after
        the intermediate's end-of-sequence token or after ``max_rounds``).
      capacity: the most chain tokens the target verifies (default 2 x ``min_draft_length``).
      max_rounds: intermediate passes per proposal at most (default ``min_draft_length``).
    """

    intermediate: Model
    top: Any
    target_vocab_size: int
    min_draft_length: int = 6
    capacity: int = 0
    max_rounds: int = 0
    attention: str = "xla"
    prefill_chunk: int = PREFILL_CHUNK
    hidden_layers: tuple[int, ...] = ()

    def __post_init__(self):
        vocab = self.intermediate.config.vocab_size
        if vocab != self.target_vocab_size:
            raise VocabMismatchError(f"intermediate model vocab_size {vocab} != target vocab_size "
                                     f"{self.target_vocab_size}: it must share the target's tokenizer and vocabulary")
        if not isinstance(self.top, SUPPORTED_TOPS):
            raise ValueError(f"the top drafter must be one of {[t.__name__ for t in SUPPORTED_TOPS]}, got "
                             f"{type(self.top).__name__} (EAGLE-3 heads and host drafters are not supported as tops)")
        top_vocab = self.top.vocab_size if isinstance(self.top, TokenRecyclingDrafter) else self.top.target_vocab_size
        if top_vocab != vocab:
            raise VocabMismatchError(f"top drafter vocab_size {top_vocab} != intermediate vocab_size {vocab}")
        if self.min_draft_length < 1:
            raise ValueError(f"min_draft_length must be >= 1, got {self.min_draft_length}")
        self.capacity = self.capacity or 2 * self.min_draft_length
        self.max_rounds = self.max_rounds or self.min_draft_length
        if self.capacity < self.min_draft_length:
            raise ValueError(f"capacity {self.capacity} < min_draft_length {self.min_draft_length}: the target "
                             "could never verify a whole minimum-length chain")
        if self.max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1, got {self.max_rounds}")

    @property
    def params(self) -> tuple:
        return (self.intermediate.params, self.top.params)

    def _overshoot(self) -> int:
        """The most chain tokens a propose runs ahead of the target (a row below the minimum runs
        one more round, which emits at most the top's whole tree plus a bonus)."""
        return self.min_draft_length + self.top.capacity + 1

    def init_state(self, batch_size: int, max_len: int) -> HierarchicalState:
        cfg = self.intermediate.config
        slots = max_len + self._overshoot() + self.top.capacity + 1  # the chain, then one top tree above it
        cache = KVCache.zeros(cfg, batch_size, slots, self.intermediate.params["embed"].dtype)
        zeros = jnp.zeros(batch_size, jnp.int32)
        inter = DecodeState(cache=cache, lengths=zeros, last_tokens=zeros,
                            remaining=jnp.full(batch_size, _NO_BUDGET, jnp.int32),
                            finished=jnp.zeros(batch_size, bool), rng=jax.random.key(0),
                            sampling=SamplingParams.make(batch_size))
        top = self.top.init_state(batch_size, max_len + self._overshoot() + 1)
        return HierarchicalState(inter, top, zeros, jnp.zeros(batch_size, bool), zeros)

    def prefill(self, params, dstate: HierarchicalState, prompt_tokens, prompt_lengths, first_tokens,
                hidden=None) -> HierarchicalState:
        """The intermediate caches the prompt (the first token is the root, uncached, as in the
        target's state); the top drafter is prefilled as for its own target."""
        inter_params, top_params = params
        cfg = self.intermediate.config
        b = prompt_tokens.shape[0]
        lengths = prompt_lengths.astype(jnp.int32)

        def feed(cache, start, chunk):
            positions = start + jnp.broadcast_to(jnp.arange(chunk.shape[1], dtype=jnp.int32), chunk.shape)
            real = positions < lengths[:, None]
            mask = jnp.tril(jnp.ones((chunk.shape[1],) * 2, bool))[None] & real[:, None, :] & real[:, :, None]
            return forward_hidden(inter_params, cfg, chunk, positions, cache, jnp.full(b, start), mask,
                                  attention=self.attention)[1]

        cache = scan_chunks(feed, dstate.inter.cache, (prompt_tokens,), self.prefill_chunk)
        inter = dstate.inter.replace(cache=cache, lengths=lengths, last_tokens=first_tokens.astype(jnp.int32))
        top = self.top.prefill(top_params, dstate.top, prompt_tokens, prompt_lengths, first_tokens, None)
        return dataclasses.replace(dstate, inter=inter, top=top, base=lengths)

    def propose(self, params, dstate: HierarchicalState, root_tokens, lengths, sampling, key, *,
                with_q: bool = False) -> tuple[DraftTree, HierarchicalState]:
        inter_params, top_params = params
        cfg = self.intermediate.config
        b, cap = root_tokens.shape[0], self.capacity
        # The target's keys: the intermediate draws each position with the target's noise for it.
        inter = dstate.inter.replace(lengths=lengths.astype(jnp.int32), last_tokens=root_tokens.astype(jnp.int32),
                                     finished=jnp.zeros(b, bool), remaining=jnp.full(b, _NO_BUDGET, jnp.int32),
                                     rng=key, sampling=sampling)
        rows = jnp.arange(b)[:, None]

        def more(carry):
            i, _, _, _, n, _, stopped, _ = carry
            return (i < self.max_rounds) & jnp.any(~stopped & (n < self.min_draft_length))

        def round_(carry):
            i, inter, top, chain, n, logp, stopped, passes = carry
            active = ~stopped & (n < self.min_draft_length)
            inter = inter.replace(finished=~active)  # rows done emit nothing this round
            tree, top = self.top.propose(top_params, top, inter.last_tokens, inter.lengths, inter.sampling,
                                         key, with_q=with_q)
            inter, acc, aux = step_impl(inter_params, inter, tree, cfg=cfg, attention=self.attention,
                                        eos_ids=cfg.eos_token_ids, hidden_layers=tuple(self.top.hidden_layers))
            top = self.top.update(top_params, top, acc, aux)
            chain, logp = _append(chain, logp, n, acc, aux.logits, rows)
            stopped = stopped | (inter.finished & active)  # only an end-of-sequence token finishes an active row
            return i + 1, inter, top, chain, n + acc.num, logp, stopped, passes + active.astype(jnp.int32)

        init = (jnp.int32(0), inter, dstate.top, jnp.zeros((b, cap), jnp.int32), jnp.zeros(b, jnp.int32),
                jnp.zeros((b, cap), jnp.float32), dstate.idle, dstate.inter_passes)
        _, inter, top, chain, n, logp, _, passes = lax.while_loop(more, round_, init)
        valid = jnp.arange(cap)[None, :] < n[:, None]
        tree = DraftTree(tokens=jnp.where(valid, chain, 0),
                         parents=jnp.broadcast_to(jnp.arange(cap, dtype=jnp.int32) - 1, (b, cap)), valid=valid,
                         draft_probs=jnp.where(valid, jnp.exp(logp), 0.0))
        inter = inter.replace(rng=dstate.inter.rng)  # the target's keys are not state (their shape is the loop's)
        return tree, dataclasses.replace(dstate, inter=inter, top=top, base=lengths.astype(jnp.int32),
                                         inter_passes=passes)

    def update(self, params, dstate: HierarchicalState, accepted, aux=None) -> HierarchicalState:
        """Bring the intermediate and the top back to the target's context after a step that emitted
        ``accepted.tokens[:, :num]`` (also after a plain step, with no propose before it)."""
        inter_params, top_params = params
        inter, base, num = dstate.inter, dstate.base, accepted.num
        b = num.shape[0]
        cached = inter.lengths - base  # context tokens from the root on that the intermediate has cached
        # Context token j from the root: the root itself (j = 0; uncached only after a plain step), else
        # emitted token j - 1. The target keeps ``num`` of them; at most the next one is missing.
        index = jnp.clip(cached - 1, 0, accepted.tokens.shape[1] - 1)
        emitted = jnp.take_along_axis(accepted.tokens, index[:, None], axis=1)[:, 0]
        missing = jnp.where(cached == 0, inter.last_tokens, emitted)

        def feed_missing():
            slot = base + cached  # for rows that miss nothing this slot lies past their new length
            return forward_hidden(inter_params, self.intermediate.config, missing[:, None], slot[:, None], inter.cache,
                                  slot, causal_mask(b, 1), attention=self.attention)[1]

        cache = lax.cond(jnp.any(num > cached), feed_missing, lambda: inter.cache)
        last = jnp.take_along_axis(accepted.tokens, jnp.maximum(num - 1, 0)[:, None], axis=1)[:, 0]
        root = jnp.where(num > 0, last, inter.last_tokens)
        inter = inter.replace(cache=cache, lengths=base + num, last_tokens=root)
        top = self._rewind_top(top_params, dstate.top, base, num, last)
        return dataclasses.replace(dstate, inter=inter, top=top, base=base + num, idle=num == 0)

    def _rewind_top(self, top_params, top, base, num, last):
        """The top drafter at the target's context: ``base + num`` tokens cached, root ``last``."""
        fed = (num > 0).astype(jnp.int32)
        if isinstance(self.top, DraftModelDrafter):
            # Its cache holds the root and every intermediate-accepted token from ``base`` on; keep the
            # ones the target accepted and feed the new root (the bonus).
            kept = dataclasses.replace(top, lengths=base + jnp.maximum(num, 1))
            return self.top.catch_up(top_params, kept, last[:, None], fed)
        # Token Recycling: only the root changes (the target scored no node of the top's tree).
        b = num.shape[0]
        zeros = jnp.zeros((b, 1), jnp.int32)
        root_only = Accepted(tokens=last[:, None], num=fed, num_draft_accepted=zeros[:, 0], path=zeros)
        no_scores = StepAux(logits=jnp.zeros((b, 0, self.target_vocab_size), jnp.float32), hidden=None)
        return self.top.update(top_params, top, root_only, no_scores)

    def end_batch(self, dstate: HierarchicalState) -> None:
        """Keep the top's learned state (Token Recycling's table) and the intermediate's pass counts."""
        self.last_inter_passes = jax.device_get(dstate.inter_passes)
        self.top.end_batch(dstate.top)


def _append(chain, logp, n, acc: Accepted, logits, rows):
    """Append a round's emitted tokens to the chains [B, C] at offsets ``n``, with their cumulative
    log-probability under the intermediate (temperature 1: the chain's ranking, never acceptance)."""
    width = acc.tokens.shape[1]
    emitted = jnp.arange(width)[None, :] < acc.num[:, None]
    node_logp = jax.nn.log_softmax(jnp.take_along_axis(logits, acc.path[:, :, None], axis=1), axis=-1)
    token_logp = jnp.where(emitted, jnp.take_along_axis(node_logp, acc.tokens[:, :, None], axis=2)[..., 0], 0.0)
    last = jnp.clip(n - 1, 0, logp.shape[1] - 1)
    before = jnp.where(n > 0, jnp.take_along_axis(logp, last[:, None], axis=1)[:, 0], 0.0)
    slots = jnp.where(emitted, n[:, None] + jnp.arange(width)[None, :], chain.shape[1])  # past the end: dropped
    chain = chain.at[rows, slots].set(acc.tokens, mode="drop")
    logp = logp.at[rows, slots].set(before[:, None] + jnp.cumsum(token_logp, axis=1), mode="drop")
    return chain, logp


def load_hierarchical(target, drafter_model: str, *, min_draft_length: int = 6, capacity: Optional[int] = None,
                      top_capacity: int = 16, dtype=None) -> HierarchicalDrafter:
    """``--drafter hierarchical --drafter-model INTERMEDIATE[,HEAD]``: the intermediate model directory
    and, optionally, a draft-model directory drafting for it (default: Token Recycling)."""
    from specjax.drafters.hybrid import load_device_drafter
    from specjax.models.loading import load_model

    dirs = [d for d in drafter_model.split(",") if d]
    if not 1 <= len(dirs) <= 2:
        raise ValueError(f"--drafter hierarchical takes --drafter-model INTERMEDIATE[,HEAD], got {len(dirs)} "
                         "directories")
    dtype = dtype if dtype is not None else target.params["embed"].dtype
    intermediate = load_model(dirs[0], dtype=dtype)
    vocab = target.config.vocab_size
    if len(dirs) == 2:
        top = load_device_drafter(dirs[1], intermediate, top_capacity)
    else:
        top = TokenRecyclingDrafter(vocab, capacity=top_capacity)
    return HierarchicalDrafter(intermediate, top, vocab, min_draft_length=min_draft_length, capacity=capacity or 0)
