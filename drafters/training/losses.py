"""The distillation losses, Draft-OPD's weights and the jitted train step.

EAGLE-3: soft cross-entropy at every unroll step of the training-time test
(``rollouts.py``), step i weighted by ``step_decay ** i``. The optional feature
loss (Smooth L1, weight ``feature_weight``, default 0 as in EAGLE-3; SpecVLM
uses it) regresses the head's output at (i, j) on the quantity drafting feeds
in its place: the fused target features of position j + 1 + i (stop-gradient).

Draft model: soft cross-entropy to the target's distribution at every position.

``opd`` (Draft-OPD, on-policy distillation): the online batch (the target's
continuation, which is also what a lossless speculative loop emits: the
target-assisted rollout), plus the drafter's own drafting replayed on it. For
EAGLE-3: a greedy chain of depth ``k`` from root r is accepted while the
drafter's top-1 agrees with the target's, so the loop is simulated exactly:
roots start at the first generated token, and after a accepted drafts the
next root is the target's correction (r + a + 1), where drafting restarts.
From every root the loop visits, the head drafts its *own* chain
(``unroll_own_chain``: its own hidden states and its own proposed tokens,
exactly as at inference), the frozen target verifies that chain
(``target_chain_logits``: the target's logits on the drafted text), and the
head is trained by soft cross-entropy to the target at every node of the
chain: the accepted ones, the first rejected one (the feedback on the
rejected proposal) and those below it (states its own error induced, which a
fixed trajectory never contains). This term, weighted ``opd_weight`` (decay
``step_decay ** i`` by depth), is added to the TTT loss of ``online``. Its
cost in target tokens, k - 1 drafted tokens per visited chain, is counted in
``history["target_tokens"]`` (``target_tokens_of_step``), so that runs can be
compared at equal target tokens. (The chains of all S roots are verified in
one pass for static shapes; only the visited ones are counted and trained.)
For a draft model, ``opd`` is the on-policy *weighting* only: on a chain the
loop visits, ``1 + opd_weight`` at the accepted depths and ``1 + 2
opd_weight`` at the first rejected one, a position taking the largest weight
of the chains over it (``opd_weights``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from specjax.drafters import visual_compressor as vc
from specjax.drafters.eagle3 import draft_logits, fuse_features
from specjax.drafters.training.options import TrainOptions
from specjax.drafters.training.rollouts import (_gather_positions, causal_logits, target_chain_logits, ttt_alignment,
                                                unroll_head, unroll_own_chain)
from specjax.models.config import ModelConfig
from specjax.models.decoder import KVCache, causal_mask, forward, forward_hidden, lm_head
from specjax.models.training import make_optimizer


def soft_cross_entropy(teacher_logits: jax.Array, student_logits: jax.Array) -> jax.Array:
    """-sum_v p_teacher(v) log q_student(v) over the last axis (fp32)."""
    p = jax.nn.softmax(teacher_logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(p * jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1), axis=-1)


# ------------------------------------------------------------------ on-policy (Draft-OPD) weights


def accepted_depths(match: jax.Array, valid: jax.Array) -> jax.Array:
    """Leading agreements per chain: int32 [B, S] from match/valid bool [k, B, S]."""
    return jnp.sum(jnp.cumprod(match & valid, axis=0), axis=0).astype(jnp.int32)


def visited_roots(accepted: jax.Array, first_root: jax.Array) -> jax.Array:
    """bool [B, S]: the chains a greedy speculative loop visits, starting at ``first_root``
    [B]; after ``a`` accepted drafts the next chain starts at the correction, ``a + 1`` on."""
    b, s = accepted.shape

    def scan(nxt, col):
        j, acc = col
        here = nxt == j
        return jnp.where(here, j + acc + 1, nxt), here

    _, visited = jax.lax.scan(scan, first_root.astype(jnp.int32),
                              (jnp.arange(s, dtype=jnp.int32), accepted.T))
    return visited.T


def opd_weights(match: jax.Array, valid: jax.Array, first_root: jax.Array, opd_weight: float) -> jax.Array:
    """float [k, B, S]: on a chain the loop visits, 1 + ``opd_weight`` at the accepted depths and
    1 + 2 ``opd_weight`` at the first rejected one; 1 elsewhere (see the module docstring)."""
    acc = accepted_depths(match, valid)
    visited = (visited_roots(acc, first_root)[None] & valid).astype(jnp.float32)
    depth = jnp.arange(match.shape[0])[:, None, None]
    reached = (depth <= acc[None]).astype(jnp.float32) + (depth == acc[None]).astype(jnp.float32)
    return 1.0 + opd_weight * visited * reached


def replay_weights(match: jax.Array, valid: jax.Array, first_root: jax.Array, step_decay: float) -> jax.Array:
    """float [k, B, S]: ``step_decay ** i`` at every valid depth i of the chains a greedy loop visits
    (``visited_roots`` from the leading agreements of ``match``), 0 elsewhere. Past a chain's first
    rejection the drafter's own chain leaves the target's text: those are the draft-induced states,
    kept (with the target's feedback on them) rather than cut off."""
    visited = visited_roots(accepted_depths(match, valid), first_root)
    decay = jnp.asarray([step_decay ** i for i in range(match.shape[0])], jnp.float32)[:, None, None]
    return decay * (visited[None] & valid).astype(jnp.float32)


def own_chain_teacher(tparams, tcfg: ModelConfig, tokens: jax.Array, drafts: jax.Array, teacher: jax.Array,
                      k: int) -> jax.Array:
    """The target's logits [k, B, S, V] at the nodes of the drafter's own chains (``unroll_own_chain``):
    step 0 of chain j is verified by the row's own logits at j + 1 (``teacher`` [B, S, V]); step
    i > 0 by the target run on the row up to j + 1 followed by drafts 0..i-1 of chain j
    (``target_chain_logits``, whose chains are indexed by their root position j + 1)."""
    pos0, _ = ttt_alignment(jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32), tokens.shape[1], 1)
    first = _gather_positions(teacher, pos0[0])[None]
    if k == 1:
        return first
    chains = jnp.roll(drafts[: k - 1], 1, axis=2)  # chain j's drafts, indexed by root j + 1
    return jnp.concatenate([first, jnp.roll(target_chain_logits(tparams, tcfg, tokens, chains), -1, axis=2)])


# ------------------------------------------------------------------ the losses


def _metrics(match, valid, weight_mask):
    """Top-1 agreement at unroll step 0 and the expected accepted length of a greedy chain
    (+1 for the target's own token: an estimate of tokens per pass), over generated chains."""
    chains = valid[0] & weight_mask
    n = jnp.maximum(jnp.sum(chains), 1)
    top1 = jnp.sum(match[0] & chains) / n
    accepted = accepted_depths(match, valid)
    return top1, 1.0 + jnp.sum(jnp.where(chains, accepted, 0)) / n


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything static about a train step (hashable: one compile serves every run alike)."""

    kind: str
    method: str
    target_cfg: ModelConfig
    drafter_cfg: object  # Eagle3Config or ModelConfig
    options: TrainOptions
    hidden_layers: tuple
    steps: int


def make_optimizer_for(spec: StepSpec) -> optax.GradientTransformation:
    opts = spec.options
    warmup = spec.steps // 10 if opts.warmup_steps is None else opts.warmup_steps
    return make_optimizer(opts.lr, spec.steps, warmup, opts.weight_decay)


@functools.partial(jax.jit, static_argnames=("spec",))
def train_step(params, opt_state, frozen, tparams, tokens, valid, plen, input_embeds=None, *, spec: StepSpec):
    """One AdamW step on the distillation loss; returns (params, opt_state, loss, top1, tokens/pass,
    verify tokens: the drafted tokens the target scored for opd's on-policy replay). ``input_embeds``
    [B, S, H]: the target's input embeddings where they are not the tokens' (images merged)."""
    loss_fn = make_loss(spec.kind, spec.method, spec.target_cfg, spec.drafter_cfg, spec.options, spec.hidden_layers)
    (loss, (top1, tpp, verified)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, frozen, tparams, tokens, valid, plen, input_embeds)
    updates, opt_state = make_optimizer_for(spec).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, top1, tpp, verified


def make_loss(kind: str, method: str, tcfg: ModelConfig, dcfg, opts: TrainOptions, hidden_layers):
    """loss(params, frozen, target_params, tokens, valid_lengths, prompt_lengths, input_embeds) -> (loss, metrics)."""
    k = opts.ttt_steps

    def chain_weights(match, valid, prompt_lengths, first_root_offset):
        s = match.shape[2]
        in_gen = jnp.arange(s)[None, :] >= (prompt_lengths - first_root_offset)[:, None]
        base = jnp.where(in_gen, 1.0, opts.prompt_weight)[None] * jnp.asarray(
            [opts.step_decay ** i for i in range(k)], jnp.float32)[:, None, None]
        if method == "opd" and kind == "draft-model":
            base = base * opd_weights(match, valid, prompt_lengths - first_root_offset, opts.opd_weight)
        return base * valid, in_gen

    def ttt_terms(full, frozen, fused, tokens, teacher, valid_lengths, prompt_lengths):
        """The training-time test on one (possibly compacted) sequence: per-row loss sums [B], per-row
        chain counts [B], and (match, valid, in_gen, weights) for the metrics and opd."""
        s = tokens.shape[1]
        outs = unroll_head(dcfg, full, fused, tokens, k)
        pos, valid = ttt_alignment(valid_lengths, s, k)
        draft_ids = jnp.arange(dcfg.draft_vocab_size) + frozen["d2t"]
        logits = draft_logits(dcfg, full, outs)  # [k, B, S, Vd]
        t_logits = jnp.stack([_gather_positions(teacher, pos[i]) for i in range(k)])[..., draft_ids]
        ce = soft_cross_entropy(t_logits, logits)
        match = (jnp.argmax(logits, -1) == jnp.argmax(t_logits, -1)) & valid
        weights, in_gen = chain_weights(jax.lax.stop_gradient(match), valid, prompt_lengths, 1)
        per_row = jnp.sum(weights * ce, axis=(0, 2))
        if opts.feature_weight:
            want = jax.lax.stop_gradient(jnp.stack([_gather_positions(fused, pos[i]) for i in range(k)]))
            l1 = jnp.mean(optax.huber_loss(outs, want, delta=1.0), axis=-1)
            per_row = per_row + opts.feature_weight * jnp.sum(weights * l1, axis=(0, 2))
        return per_row, jnp.sum(weights[0] > 0, axis=1), (match, valid, in_gen, weights)

    def mean_loss(per_row, count):
        return jnp.sum(per_row) / jnp.maximum(jnp.sum(count), 1)

    def compressed_terms(full, frozen, fused, tokens, teacher, valid_lengths, prompt_lengths):
        """SpecVLM's elastic compressor: the head trained on every operator's compacted sequence
        (and the uncompressed one), the gate on which operator served each prompt best."""
        comp = dcfg.compressor
        span = vc.image_span(comp, tokens, prompt_lengths)
        image = vc.image_features(comp, fused, span)
        per_row, count, uncompressed = ttt_terms(full, frozen, fused, tokens, teacher, valid_lengths, prompt_lengths)
        losses, row_losses = [mean_loss(per_row, count)], []
        for compressed in vc.compress_all(comp, full["compressor"], image):
            f, (t, te) = vc.compact(span, comp.kept, compressed, fused, [tokens, teacher])
            per_row, count, _ = ttt_terms(full, frozen, f, t, te, valid_lengths - span.removed,
                                          prompt_lengths - span.removed)
            losses.append(mean_loss(per_row, count))
            row_losses.append(per_row / jnp.maximum(count, 1))
        best = jnp.argmin(jax.lax.stop_gradient(jnp.stack(row_losses)), axis=0)
        asked = vc.question_mask(span, prompt_lengths, tokens.shape[1], comp.image_tokens)
        gate = vc.gate_logits(full["compressor"], jax.lax.stop_gradient(image), jax.lax.stop_gradient(fused), asked)
        gate_ce = -jnp.take_along_axis(jax.nn.log_softmax(gate, axis=-1), best[:, None], axis=1)[:, 0]
        has_image = (span.removed > 0).astype(jnp.float32)
        gate_loss = jnp.sum(gate_ce * has_image) / jnp.maximum(jnp.sum(has_image), 1.0)
        return sum(losses) / len(losses) + gate_loss, uncompressed  # the metrics: the uncompressed sequence's

    def eagle3_loss(params, frozen, tparams, tokens, valid_lengths, prompt_lengths, input_embeds=None):
        b, s = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        x, _, hidden = forward_hidden(tparams, tcfg, tokens, positions, KVCache.zeros(tcfg, b, s),
                                      jnp.zeros(b, jnp.int32), causal_mask(b, s, valid_lengths),
                                      hidden_layers=hidden_layers, input_embeds=input_embeds)
        teacher = jax.lax.stop_gradient(lm_head(tparams, tcfg, x))
        hidden = jax.lax.stop_gradient(hidden)
        full = {**params, **frozen}
        fused = fuse_features(full, hidden)
        if dcfg.compressor is not None:
            loss, (match, valid, in_gen, weights) = compressed_terms(full, frozen, fused, tokens, teacher,
                                                                     valid_lengths, prompt_lengths)
            return loss, (*_metrics(match, valid, in_gen), jnp.zeros((), jnp.int32))
        per_row, count, (match, valid, in_gen, weights) = ttt_terms(full, frozen, fused, tokens, teacher,
                                                                    valid_lengths, prompt_lengths)
        loss = mean_loss(per_row, count)
        verified = jnp.zeros((), jnp.int32)
        if method == "opd":  # Draft-OPD: replay the drafter's own chains from the roots the loop visits
            draft_ids = jnp.arange(dcfg.draft_vocab_size) + frozen["d2t"]
            own_outs, drafts = unroll_own_chain(dcfg, full, fused, tokens, k)
            own_teacher = jax.lax.stop_gradient(own_chain_teacher(tparams, tcfg, tokens, drafts, teacher, k))
            own_ce = soft_cross_entropy(own_teacher[..., draft_ids], draft_logits(dcfg, full, own_outs))
            replay = replay_weights(jax.lax.stop_gradient(match), valid, prompt_lengths - 1, opts.step_decay)
            loss = loss + opts.opd_weight * jnp.sum(replay * own_ce) / jnp.maximum(jnp.sum(weights[0] > 0), 1)
            verified = jnp.sum(replay[1:] > 0).astype(jnp.int32)
        return loss, (*_metrics(match, valid, in_gen), verified)

    def draft_model_loss(params, frozen, tparams, tokens, valid_lengths, prompt_lengths, input_embeds=None):
        b, s = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        mask = causal_mask(b, s, valid_lengths)
        teacher = jax.lax.stop_gradient(
            forward(tparams, tcfg, tokens, positions, KVCache.zeros(tcfg, b, s), jnp.zeros(b, jnp.int32), mask,
                    input_embeds=input_embeds).logits)
        logits = causal_logits(params, dcfg, tokens)
        ce_pos = soft_cross_entropy(teacher, logits)
        valid_pos = jnp.arange(s)[None, :] < valid_lengths[:, None]
        match_pos = (jnp.argmax(logits, -1) == jnp.argmax(teacher, -1)) & valid_pos
        idx = jnp.arange(s)[None, None, :] + jnp.arange(k)[:, None, None]  # depth i of chain j: position j + i
        shift = lambda x: jnp.stack([_gather_positions(x, jnp.broadcast_to(idx[i, 0], x.shape)) for i in range(k)])
        valid = shift(valid_pos) & (idx < s)
        match = shift(match_pos) & valid
        weights, in_gen = chain_weights(jax.lax.stop_gradient(match), valid, prompt_lengths, 0)
        # Each position's loss once, weighted by the largest weight any chain gives it.
        per_pos = _scatter_max(weights, idx, s)
        loss = jnp.sum(per_pos * ce_pos) / jnp.maximum(jnp.sum(per_pos > 0), 1)
        return loss, (*_metrics(match, valid, in_gen), jnp.zeros((), jnp.int32))

    return eagle3_loss if kind == "eagle3" else draft_model_loss


def _scatter_max(weights: jax.Array, idx: jax.Array, s: int) -> jax.Array:
    """Chain-term weights [k, B, S] -> per-position [B, S]: the max over terms at that position."""
    k, b, _ = weights.shape
    flat_idx = jnp.broadcast_to(idx, weights.shape).transpose(1, 0, 2).reshape(b, -1)
    return jnp.zeros((b, s)).at[jnp.arange(b)[:, None], flat_idx].max(
        weights.transpose(1, 0, 2).reshape(b, -1), mode="drop")
