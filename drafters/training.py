"""Drafter training: EAGLE-3 heads and draft models distilled online from a frozen target.

The target runs frozen inside the jitted train step: from a token batch it
computes its logits (the teacher distribution) and, for EAGLE-3, the hidden
states of the head's feature layers (SpecVLM's online distillation: nothing but
token ids is stored). The drafter is trained by soft cross-entropy to the
target's next-token distribution.

EAGLE-3 training-time test (TTT, Li et al.): the head is unrolled ``k`` steps
exactly as it drafts a chain. Unroll step 0 at position j pairs the fused
target features of position j with token j + 1 (the alignment in
``eagle3.py``); unroll step i > 0 at chain j feeds the head its *own* output
hidden of step i - 1 (as a draft node is paired with its parent's draft output
hidden) with token j + 1 + i, at RoPE position j + i, attending to the step-0
pairs at positions <= j and to its own chain's steps 1..i (its tree ancestors).
Step i at chain j predicts token j + 2 + i: its teacher is the target's
distribution at position j + 1 + i (the logits that verify that draft node).
Step i's loss is weighted by ``step_decay ** i``. The optional feature loss
(Smooth L1, weight ``feature_weight``, default 0 as in EAGLE-3; SpecVLM uses
it) regresses the head's output at (i, j) on the quantity drafting feeds in its
place: the fused target features of position j + 1 + i (stop-gradient).

Draft model: a small Llama with the target's vocabulary, soft cross-entropy to
the target's distribution at every position.

Methods (where the token batches come from):

- ``sft``: target continuations of the prompts generated once, then trained on
  as a fixed dataset (cycled).
- ``online``: fresh target continuations of the next prompts at every step.
  With greedy rollouts (``rollout_temperature=0``) of a prompt list that a run
  goes through at most once, this is the same data as ``sft``; they differ with
  sampled rollouts (fresh samples every step, e.g. prompts sampled from BOS) or
  when ``sft_sequences`` makes the fixed pool smaller than the prompt stream.
- ``opd`` (Draft-OPD, on-policy distillation): the online batch (the target's
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

With several devices that divide the batch, the batch is sharded over a mesh's
``data`` axis (params replicated): data parallel, the same math.

Outputs in ``out_dir``: ``config.json`` + ``model.safetensors`` that
``load_eagle3`` (EAGLE-3) or ``load_model`` (draft model: a Hugging Face Llama
directory) read, ``history.json``, ``curves.png``, and orbax checkpoints in
``checkpoints/`` (``resume=True`` continues exactly).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import sys
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from specjax.drafters.eagle3 import (Eagle3Config, _finish, _qkv, default_hidden_layers, draft_logits,
                                     fuse_features, load_eagle3)
from specjax.models.config import ModelConfig
from specjax.models.decoder import (KVCache, causal_mask, forward, forward_hidden, init_params, linear, lm_head,
                                    mlp_block, qkv_projection, rms_norm)
from specjax.models.rope import inverse_frequencies
from specjax.models.loading import Model, load_model
from specjax.models.training import (TrainCheckpointer, TrainState, export_llama, llama_hf_config, make_optimizer,
                                     plot_curves, save_hf_checkpoint, to_bf16)

KINDS = ("eagle3", "draft-model")
METHODS = ("sft", "online", "opd")


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """Hyperparameters (defaults in parentheses are EAGLE-3's / this module's choices)."""

    batch_size: int = 8
    seq_len: int = 128
    lr: float = 3e-3
    warmup_steps: Optional[int] = None  # default: steps // 10
    weight_decay: float = 0.01
    seed: int = 0
    ttt_steps: int = 7  # EAGLE-3 unroll depth k; also the chain depth of acceptance estimates
    step_decay: float = 0.8  # weight of unroll step i: step_decay ** i
    feature_weight: float = 0.0  # Smooth L1 on features (EAGLE-3: 0; SpecVLM: > 0)
    opd_weight: float = 2.0  # weight of opd's on-policy replay term (EAGLE-3) / of visited depths (draft model)
    prompt_weight: float = 0.1  # loss weight of chains inside the prompt (drafting happens after it)
    rollout_temperature: float = 0.0  # target continuations: 0 = greedy (prompts from BOS: always 1)
    sft_sequences: Optional[int] = None  # size of sft's fixed pool (default: one per prompt)
    save_every: int = 100
    keep: int = 2
    draft_layers: int = 1
    draft_hidden: Optional[int] = None  # default: the target's hidden size (embedding initialized from it)

    def __post_init__(self):
        if self.seq_len < 8 or self.batch_size < 1 or self.ttt_steps < 1:
            raise ValueError("seq_len must be >= 8, batch_size and ttt_steps >= 1")


@dataclasses.dataclass
class TrainResult:
    history: dict
    params: dict  # the final trained params (float32)
    out_dir: str
    config_path: str
    weights_path: str
    plot_path: Optional[str]
    checkpoint_dir: str


# ------------------------------------------------------------------ the target's rollouts


def rollout(params, cfg: ModelConfig, tokens: jax.Array, prompt_lengths: jax.Array, key: jax.Array,
            temperature: float) -> tuple[jax.Array, jax.Array]:
    """Continue each right-padded prompt with the target up to the buffer's width [B, S].

    Returns the filled tokens and each row's valid length (through its first generated EOS)."""
    b, s = tokens.shape
    cache = KVCache.zeros(cfg, b, s + 1, params["embed"].dtype)
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    out = forward(params, cfg, tokens, positions, cache, jnp.zeros(b, jnp.int32),
                  causal_mask(b, s, prompt_lengths))
    logits = jnp.take_along_axis(out.logits, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]
    eos = jnp.asarray(cfg.eos_token_ids or (-1,), jnp.int32)

    def pick(key, logits):
        if temperature == 0.0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)

    def cond(carry):
        _, lengths, done, *_ = carry
        return jnp.any(~done & (lengths < s))

    def body(carry):
        tokens, lengths, done, cache, logits, key = carry
        key, sub = jax.random.split(key)
        nxt = pick(sub, logits)
        live = ~done & (lengths < s)
        tokens = tokens.at[jnp.arange(b), jnp.where(live, lengths, s)].set(nxt, mode="drop")
        done = done | (live & jnp.isin(nxt, eos))
        out = forward(params, cfg, nxt[:, None], lengths[:, None], cache, lengths, jnp.ones((b, 1, 1), bool))
        return tokens, lengths + live, done, out.cache, out.logits[:, 0], key

    init = (tokens, prompt_lengths.astype(jnp.int32), jnp.zeros(b, bool), out.cache, logits, key)
    tokens, lengths, *_ = jax.lax.while_loop(cond, body, init)
    return tokens, lengths


rollout_jit = jax.jit(rollout, static_argnames=("cfg", "temperature"))


# ------------------------------------------------------------------ EAGLE-3: the training-time test


def ttt_alignment(valid_lengths: jax.Array, seq_len: int, k: int) -> tuple[jax.Array, jax.Array]:
    """For unroll step i and chain j: the position of the token fed (= of the teacher logits,
    j + 1 + i) and whether it is real (< the row's valid length). int32/bool [k, B, S]."""
    i = jnp.arange(k, dtype=jnp.int32)[:, None, None]
    j = jnp.arange(seq_len, dtype=jnp.int32)[None, None, :]
    pos = jnp.broadcast_to(j + 1 + i, (k, valid_lengths.shape[0], seq_len))
    return pos, pos < valid_lengths[None, :, None]


def _gather_positions(x: jax.Array, pos: jax.Array) -> jax.Array:
    """x [B, S, ...] at positions pos [B, S] (clipped), -> [B, S, ...]."""
    idx = jnp.clip(pos, 0, x.shape[1] - 1)
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _unrolled_attention(q, k0, v0, diag_k, diag_v, diag_visible):
    """q [B, S, Hq, D] of chain j sees the step-0 keys at positions <= j and its own chain's
    keys of the later steps (``diag_k`` [n, B, S, Hkv, D], entry m visible where
    ``diag_visible[m]``). fp32 softmax."""
    b, s, hq, d = q.shape
    hkv = k0.shape[2]
    qg = q.reshape(b, s, hkv, hq // hkv, d).astype(jnp.float32) * d ** -0.5
    scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, k0.astype(jnp.float32))
    scores = jnp.where(jnp.tril(jnp.ones((s, s), bool)), scores, -jnp.inf)
    own = jnp.einsum("bqkgd,mbqkd->bkgqm", qg, diag_k.astype(jnp.float32))
    own = jnp.where(diag_visible, own, -jnp.inf)
    weights = jax.nn.softmax(jnp.concatenate([scores, own], axis=-1), axis=-1)
    out = jnp.einsum("bkgqs,bskd->bqkgd", weights[..., :s], v0.astype(jnp.float32))
    out = out + jnp.einsum("bkgqm,mbqkd->bqkgd", weights[..., s:], diag_v.astype(jnp.float32))
    return out.reshape(b, s, hq, d).astype(q.dtype)


def unroll_head(cfg: Eagle3Config, params, fused: jax.Array, tokens: jax.Array, k: int) -> jax.Array:
    """The head's output hidden states [k, B, S, H] over k unrolled draft steps.

    ``fused`` [B, S, H]: fused target features; step 0 at chain j pairs them with token
    j + 1, step i > 0 pairs the head's own step i - 1 output with token j + 1 + i (the
    target's token: teacher forcing of the tokens, not of the hidden states).
    Steps 1..k-1 run as one ``lax.scan`` (compile time independent of k)."""
    return _unroll(cfg, params, fused, tokens, k, own_tokens=False)[0]


def unroll_own_chain(cfg: Eagle3Config, params, fused: jax.Array, tokens: jax.Array,
                     k: int) -> tuple[jax.Array, jax.Array]:
    """The head drafting its own greedy chain from every root: (outputs [k, B, S, H], drafts
    int32 [k, B, S]). Step 0 is ``unroll_head``'s; step i > 0 at chain j feeds the head's own
    step i - 1 output *and its own proposal* ``drafts[i - 1, :, j]`` (a target-vocab id, at
    position j + 1 + i), exactly as a top-1 chain drafts at inference. ``drafts[i, :, j]`` is the
    proposal for position j + 2 + i. No gradient flows through the choice of tokens."""
    return _unroll(cfg, params, fused, tokens, k, own_tokens=True)


def _draft_to_target_ids(params, logits: jax.Array) -> jax.Array:
    """Greedy proposals as target-vocabulary ids (EAGLE-3's d2t offsets)."""
    a = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.lax.stop_gradient(a + params["d2t"][a])


def _unroll(cfg: Eagle3Config, params, fused, tokens, k: int, own_tokens: bool):
    b, s = tokens.shape
    lp = params["layer"]
    pos, _ = ttt_alignment(jnp.full((b,), s, jnp.int32), s, k)

    def step(i, feats, fed):
        """Step i's layer input: (residual, q, k, v) of token ids ``fed`` paired with ``feats``."""
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32) + i, (b, s))
        return _qkv(cfg, lp, params["embed"][fed], feats, positions)

    d, hkv = cfg.layer.head_dim, cfg.layer.num_kv_heads
    diag_k = jnp.zeros((max(k - 1, 1), b, s, hkv, d), fused.dtype)
    diag_v = jnp.zeros_like(diag_k)
    residual, q, k0, v0 = step(0, fused, _gather_positions(tokens, pos[0]))
    first = _finish(cfg, lp, residual, _unrolled_attention(q, k0, v0, diag_k, diag_v,
                                                           jnp.zeros(diag_k.shape[0], bool)))

    def later(carry, i):
        feats, diag_k, diag_v = carry
        if own_tokens:
            fed = _draft_to_target_ids(params, draft_logits(cfg, params, feats))
        else:
            fed = _gather_positions(tokens, jnp.take(pos, i, axis=0))
        residual, q, kk, vv = step(i, feats, fed)
        diag_k, diag_v = diag_k.at[i - 1].set(kk.astype(diag_k.dtype)), diag_v.at[i - 1].set(vv.astype(diag_v.dtype))
        visible = jnp.arange(diag_k.shape[0]) < i
        out = _finish(cfg, lp, residual, _unrolled_attention(q, k0, v0, diag_k, diag_v, visible))
        return (out, diag_k, diag_v), out

    if k == 1:
        outs = first[None]
    else:
        _, rest = jax.lax.scan(later, (first, diag_k, diag_v), jnp.arange(1, k))
        outs = jnp.concatenate([first[None], rest])
    drafts = _draft_to_target_ids(params, draft_logits(cfg, params, outs)) if own_tokens else None
    return outs, drafts


def target_chain_logits(params, cfg: ModelConfig, tokens: jax.Array, chains: jax.Array) -> jax.Array:
    """The target verifying a chain of drafts from every root in one pass: fp32 logits [n, B, S, V].

    ``chains[m - 1, b, c]`` (m = 1..n) is the m-th drafted token after root position c (it sits at
    position c + m and continues ``tokens[b, :c + 1]``, not the rest of the row). Entry
    [m - 1, b, c] of the result is the target's next-token logits there: what verification
    compares the next draft with, and the feedback on the drafter's own proposals (below a
    rejected draft too, where the state is one the drafter induced). Like ``causal_logits``,
    built from the decoder's blocks; each chain attends to the row up to its root and to its own
    earlier drafts (``_unrolled_attention``'s pattern), so all S chains cost one pass of n S
    tokens (a loop that verifies only the chains it visits needs only those)."""
    b, s = tokens.shape
    n = chains.shape[0]
    inv_freq = inverse_frequencies(cfg.rope, cfg.head_dim)
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    chain_positions = positions[None] + jnp.arange(1, n + 1, dtype=jnp.int32)[:, None, None]
    causal = jnp.tril(jnp.ones((s, s), bool))
    g = cfg.num_heads // cfg.num_kv_heads
    own_visible = jnp.arange(n)[None, :] <= jnp.arange(n)[:, None]  # [query step, key step]

    def attend_row(q, k, v):
        qg = q.reshape(b, s, cfg.num_kv_heads, g, cfg.head_dim).astype(jnp.float32) * cfg.head_dim ** -0.5
        scores = jnp.where(causal, jnp.einsum("bqkgd,bskd->bkgqs", qg, k.astype(jnp.float32)), -jnp.inf)
        out = jnp.einsum("bkgqs,bskd->bqkgd", jax.nn.softmax(scores, axis=-1), v.astype(jnp.float32))
        return out.reshape(b, s, -1)

    def layer(carry, lp):
        x, xc = carry
        q, k, v = qkv_projection(cfg, lp, x, positions, inv_freq)
        qc, kc, vc = jax.vmap(lambda xm, pm: qkv_projection(cfg, lp, xm, pm, inv_freq))(xc, chain_positions)
        out = attend_row(q, k, v)
        outc = jax.vmap(lambda qm, vis: _unrolled_attention(qm, k, v, kc, vc, vis))(qc, own_visible)
        x = mlp_block(cfg, lp, x + linear(out.astype(x.dtype), lp["wo"], lp.get("bo")))
        xc = jax.vmap(lambda xm, om: mlp_block(cfg, lp, xm + linear(om.reshape(b, s, -1).astype(xm.dtype), lp["wo"],
                                                                    lp.get("bo"))))(xc, outc)
        return (x, xc), None

    (_, xc), _ = jax.lax.scan(layer, (params["embed"][tokens], params["embed"][chains]), params["layers"])
    return lm_head(params, cfg, rms_norm(xc, params["final_norm"], cfg.rms_norm_eps))


def causal_logits(params, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    """fp32 logits [B, S, V] of a full causal forward without a KV cache: the decoder's own
    projections and blocks with plain causal attention, differentiable (the cached forward's
    prefix loop has a data-dependent trip count, which reverse mode cannot go through)."""
    b, s = tokens.shape
    inv_freq = inverse_frequencies(cfg.rope, cfg.head_dim)
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    causal = jnp.tril(jnp.ones((s, s), bool))

    def layer(x, lp):
        q, k, v = qkv_projection(cfg, lp, x, positions, inv_freq)
        g = cfg.num_heads // cfg.num_kv_heads
        qg = q.reshape(b, s, cfg.num_kv_heads, g, cfg.head_dim).astype(jnp.float32) * cfg.head_dim ** -0.5
        scores = jnp.where(causal, jnp.einsum("bqkgd,bskd->bkgqs", qg, k.astype(jnp.float32)), -jnp.inf)
        out = jnp.einsum("bkgqs,bskd->bqkgd", jax.nn.softmax(scores, axis=-1), v.astype(jnp.float32))
        x = x + linear(out.reshape(b, s, -1).astype(x.dtype), lp["wo"], lp.get("bo"))
        return mlp_block(cfg, lp, x), None

    x, _ = jax.lax.scan(layer, params["embed"][tokens], params["layers"])
    return lm_head(params, cfg, rms_norm(x, params["final_norm"], cfg.rms_norm_eps))


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
def train_step(params, opt_state, frozen, tparams, tokens, valid, plen, *, spec: StepSpec):
    """One AdamW step on the distillation loss; returns (params, opt_state, loss, top1, tokens/pass,
    verify tokens: the drafted tokens the target scored for opd's on-policy replay)."""
    loss_fn = make_loss(spec.kind, spec.method, spec.target_cfg, spec.drafter_cfg, spec.options, spec.hidden_layers)
    (loss, (top1, tpp, verified)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, frozen, tparams, tokens, valid, plen)
    updates, opt_state = make_optimizer_for(spec).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, top1, tpp, verified


def make_loss(kind: str, method: str, tcfg: ModelConfig, dcfg, opts: TrainOptions, hidden_layers):
    """loss(params, frozen, target_params, tokens, valid_lengths, prompt_lengths) -> (loss, metrics)."""
    k = opts.ttt_steps

    def chain_weights(match, valid, prompt_lengths, first_root_offset):
        s = match.shape[2]
        in_gen = jnp.arange(s)[None, :] >= (prompt_lengths - first_root_offset)[:, None]
        base = jnp.where(in_gen, 1.0, opts.prompt_weight)[None] * jnp.asarray(
            [opts.step_decay ** i for i in range(k)], jnp.float32)[:, None, None]
        if method == "opd" and kind == "draft-model":
            base = base * opd_weights(match, valid, prompt_lengths - first_root_offset, opts.opd_weight)
        return base * valid, in_gen

    def eagle3_loss(params, frozen, tparams, tokens, valid_lengths, prompt_lengths):
        b, s = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        x, _, hidden = forward_hidden(tparams, tcfg, tokens, positions, KVCache.zeros(tcfg, b, s), jnp.zeros(b, jnp.int32),
                                      causal_mask(b, s, valid_lengths), hidden_layers=hidden_layers)
        teacher = jax.lax.stop_gradient(lm_head(tparams, tcfg, x))
        hidden = jax.lax.stop_gradient(hidden)
        full = {**params, **frozen}
        fused = fuse_features(full, hidden)
        outs = unroll_head(dcfg, full, fused, tokens, k)
        pos, valid = ttt_alignment(valid_lengths, s, k)
        draft_ids = jnp.arange(dcfg.draft_vocab_size) + frozen["d2t"]
        logits = draft_logits(dcfg, full, outs)  # [k, B, S, Vd]
        t_logits = jnp.stack([_gather_positions(teacher, pos[i]) for i in range(k)])[..., draft_ids]
        ce = soft_cross_entropy(t_logits, logits)
        match = (jnp.argmax(logits, -1) == jnp.argmax(t_logits, -1)) & valid
        weights, in_gen = chain_weights(jax.lax.stop_gradient(match), valid, prompt_lengths, 1)
        loss = jnp.sum(weights * ce) / jnp.maximum(jnp.sum(weights[0] > 0), 1)
        if opts.feature_weight:
            want = jax.lax.stop_gradient(jnp.stack([_gather_positions(fused, pos[i]) for i in range(k)]))
            l1 = jnp.mean(optax.huber_loss(outs, want, delta=1.0), axis=-1)
            loss = loss + opts.feature_weight * jnp.sum(weights * l1) / jnp.maximum(jnp.sum(weights[0] > 0), 1)
        verified = jnp.zeros((), jnp.int32)
        if method == "opd":  # Draft-OPD: replay the drafter's own chains from the roots the loop visits
            own_outs, drafts = unroll_own_chain(dcfg, full, fused, tokens, k)
            own_teacher = jax.lax.stop_gradient(own_chain_teacher(tparams, tcfg, tokens, drafts, teacher, k))
            own_ce = soft_cross_entropy(own_teacher[..., draft_ids], draft_logits(dcfg, full, own_outs))
            replay = replay_weights(jax.lax.stop_gradient(match), valid, prompt_lengths - 1, opts.step_decay)
            loss = loss + opts.opd_weight * jnp.sum(replay * own_ce) / jnp.maximum(jnp.sum(weights[0] > 0), 1)
            verified = jnp.sum(replay[1:] > 0).astype(jnp.int32)
        return loss, (*_metrics(match, valid, in_gen), verified)

    def draft_model_loss(params, frozen, tparams, tokens, valid_lengths, prompt_lengths):
        b, s = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        mask = causal_mask(b, s, valid_lengths)
        teacher = jax.lax.stop_gradient(
            forward(tparams, tcfg, tokens, positions, KVCache.zeros(tcfg, b, s), jnp.zeros(b, jnp.int32), mask).logits)
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


# ------------------------------------------------------------------ drafter construction and export


def eagle3_hf_config(tcfg: ModelConfig, hidden_layers: Sequence[int]) -> dict:
    """An EAGLE-3 head config.json for this target: one Llama layer of the target's shape,
    full draft vocabulary (d2t = 0)."""
    return llama_hf_config(dataclasses.replace(tcfg, num_layers=1), "LlamaForCausalLMEagle3",
                           draft_vocab_size=tcfg.vocab_size, target_hidden_size=tcfg.hidden_size,
                           norm_before_residual=False,
                           eagle_config={"eagle_aux_hidden_state_layer_ids": [int(i) for i in hidden_layers]})


def draft_model_hf_config(tcfg: ModelConfig, layers: int, hidden: Optional[int]) -> dict:
    """A small Llama with the target's vocabulary, tied embeddings, heads of the target's size."""
    hidden = hidden or tcfg.hidden_size
    heads = max(1, hidden // tcfg.head_dim)
    kv_heads = max(1, heads * tcfg.num_kv_heads // tcfg.num_heads)
    while heads % kv_heads:
        kv_heads -= 1
    inter = int(round(tcfg.intermediate_size * hidden / tcfg.hidden_size))
    shape = dataclasses.replace(tcfg, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                                num_heads=heads, num_kv_heads=kv_heads)
    eos = list(tcfg.eos_token_ids)
    return llama_hf_config(shape, tie_word_embeddings=True, bos_token_id=tcfg.bos_token_id,
                           eos_token_id=eos[0] if len(eos) == 1 else eos)


def _target_head(target: Model):
    p = target.params
    return p["embed"] if target.config.tie_word_embeddings else p["lm_head"]


def init_eagle3(target: Model, hidden_layers, key) -> tuple[Eagle3Config, dict, dict]:
    """(config, trainable params, frozen params): fc and the layer random; final norm and LM head
    copied from the target (the head starts out predicting like the target's last layer); the
    token embedding is the target's, frozen (not saved: ``load_eagle3`` shares the target's)."""
    from specjax.drafters.eagle3 import init_params as init_head

    cfg = Eagle3Config.from_hf(eagle3_hf_config(target.config, hidden_layers))
    fresh = init_head(cfg, key, jnp.float32, scale=0.02)
    params = {"fc": fresh["fc"], "layer": fresh["layer"],
              "final_norm": jnp.asarray(target.params["final_norm"], jnp.float32),
              "lm_head": jnp.asarray(_target_head(target), jnp.float32)}
    frozen = {"embed": jnp.asarray(target.params["embed"], jnp.float32),
              "d2t": jnp.zeros(cfg.draft_vocab_size, jnp.int32)}
    return cfg, params, frozen


def init_draft_model(target: Model, layers: int, hidden: Optional[int], key) -> tuple[ModelConfig, dict]:
    cfg = ModelConfig.from_hf(draft_model_hf_config(target.config, layers, hidden))
    params = init_params(cfg, key, jnp.float32, scale=0.02)
    if cfg.hidden_size == target.config.hidden_size:
        params["embed"] = jnp.asarray(_target_head(target), jnp.float32)
        params["final_norm"] = jnp.asarray(target.params["final_norm"], jnp.float32)
    return cfg, params


def export_eagle3(out_dir: str, hf_config: dict, params: dict) -> tuple[str, str]:
    """config.json + model.safetensors in the SafeAILab EAGLE-3 layout ``load_eagle3`` reads."""
    from specjax.drafters.eagle3 import _LAYER_TENSORS

    vocab = hf_config["vocab_size"]
    tensors = {"fc.weight": to_bf16(params["fc"]), "norm.weight": to_bf16(params["final_norm"]),
               "lm_head.weight": to_bf16(params["lm_head"]),
               "d2t": np.zeros(hf_config["draft_vocab_size"], np.int64), "t2d": np.ones(vocab, np.bool_)}
    tensors.update({name: to_bf16(params["layer"][k]) for k, name in _LAYER_TENSORS.items()})
    return save_hf_checkpoint(out_dir, hf_config, tensors)


def export_draft_model(out_dir: str, hf_config: dict, params: dict, target_dir: Optional[str]) -> tuple[str, str]:
    """A Hugging Face Llama directory (plus the target's tokenizer files, when it has them)."""
    paths = export_llama(out_dir, params, hf_config)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if target_dir and os.path.isfile(os.path.join(target_dir, name)):
            shutil.copy(os.path.join(target_dir, name), os.path.join(out_dir, name))
    return paths


def checked_init_params(fresh: dict, given: dict) -> dict:
    """``given`` (float32) in place of ``fresh``: the same names and shapes, or a ValueError naming
    the first difference (a drafter of another shape cannot be fine-tuned into this one)."""
    want = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_flatten_with_path(fresh)[0]}
    got = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_flatten_with_path(given)[0]}
    if want.keys() != got.keys():
        missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
        raise ValueError(f"initial drafter params do not match this drafter: missing {missing}, unexpected {extra}")
    for name, shape in want.items():
        if got[name] != shape:
            raise ValueError(f"initial drafter params: {name} has shape {got[name]}, this drafter needs {shape}")
    return jax.tree.map(lambda _, g: jnp.asarray(g, jnp.float32), fresh, given)


def load_init_params(kind: str, model_dir: str, target: Model) -> dict:
    """The trainable params of a drafter directory (what ``train_drafter`` writes, or a public
    EAGLE-3 head / small Llama), for ``init_params``."""
    if kind == "eagle3":
        head = load_eagle3(model_dir, target, dtype=jnp.float32)
        wanted = tuple(default_hidden_layers(target.config.num_layers))
        if tuple(head.hidden_layers) != wanted:
            raise ValueError(f"{model_dir}: the head reads target layers {list(head.hidden_layers)}, training uses "
                             f"{list(wanted)}")
        return {name: head.params[name] for name in ("fc", "layer", "final_norm", "lm_head")}
    return dict(load_model(model_dir, dtype=jnp.float32).params)


# ------------------------------------------------------------------ data


def encode_prompts(target: Model, texts: Sequence[str]) -> list[list[int]]:
    if target.tokenizer is None:
        raise ValueError("the target has no tokenizer.json: cannot encode text prompts")
    return [target.tokenizer.encode(t).ids for t in texts]


def read_prompts_jsonl(path: str) -> list[str]:
    """The ``"prompt"`` field of every line of a JSONL file."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON: {e}") from e
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f"{path}:{n}: expected an object with a string field \"prompt\"")
            out.append(row["prompt"])
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def prompt_batch(prompts: Sequence[Sequence[int]], position: int, batch_size: int,
                 seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``position .. position + B - 1`` (cyclic) right-padded to [B, seq_len]; prompts longer
    than 3/4 of ``seq_len`` keep their last tokens (room is left for the continuation)."""
    keep = max(1, seq_len * 3 // 4)
    tokens = np.zeros((batch_size, seq_len), np.int32)
    lengths = np.zeros(batch_size, np.int32)
    for r in range(batch_size):
        ids = list(prompts[(position + r) % len(prompts)])[-keep:]
        tokens[r, : len(ids)] = ids
        lengths[r] = len(ids)
    return tokens, lengths


def _start_token(cfg: ModelConfig) -> int:
    if cfg.bos_token_id is not None:
        return int(cfg.bos_token_id)
    if cfg.eos_token_ids:
        return int(cfg.eos_token_ids[0])
    raise ValueError("the target config has no bos_token_id nor eos_token_id: pass prompts to sample from")


# ------------------------------------------------------------------ the training loop


def train_drafter(target: Model, kind: str, method: str, steps: int, out_dir: str, *,
                  prompts: Optional[Sequence[Sequence[int]]] = None, options: TrainOptions = TrainOptions(),
                  resume: bool = False, progress: bool = True, init_params: Optional[dict] = None) -> TrainResult:
    """Train an EAGLE-3 head (``kind="eagle3"``) or a draft model for ``target`` (see the module
    docstring); ``prompts`` are token-id lists (None: sequences sampled from the target at BOS).
    ``init_params`` (the trainable params of a drafter of the same shape, e.g. ``load_init_params``)
    replace the random initialization: fine-tuning a trained drafter, or continuing it with another
    method. A resumed checkpoint takes precedence over it."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    opts = options
    tcfg = target.config
    from_bos = prompts is None
    if from_bos:
        prompts = [[_start_token(tcfg)]]
    bad = [i for i, p in enumerate(prompts) if not len(p) or min(p) < 0 or max(p) >= tcfg.vocab_size]
    if bad:
        raise ValueError(f"prompt {bad[0]} is empty or has token ids outside the vocab [0, {tcfg.vocab_size})")
    temperature = 1.0 if from_bos else opts.rollout_temperature
    tparams = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), target.params)
    key = jax.random.key(opts.seed)
    init_key, data_key, sft_key = jax.random.split(key, 3)

    hidden_layers = default_hidden_layers(tcfg.num_layers) if kind == "eagle3" else ()
    if kind == "eagle3":
        dcfg, params, frozen = init_eagle3(target, hidden_layers, init_key)
        hf_config = eagle3_hf_config(tcfg, hidden_layers)
    else:
        dcfg, params = init_draft_model(target, opts.draft_layers, opts.draft_hidden, init_key)
        frozen = {}
        hf_config = draft_model_hf_config(tcfg, opts.draft_layers, opts.draft_hidden)
    if init_params is not None:
        params = checked_init_params(params, init_params)
    spec = StepSpec(kind, method, tcfg, dcfg, opts, tuple(hidden_layers), steps)
    optimizer = make_optimizer_for(spec)

    mesh = _data_mesh(opts.batch_size)
    place_batch = (lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))) if mesh else jnp.asarray
    replicate = (lambda t: jax.device_put(t, NamedSharding(mesh, PartitionSpec()))) if mesh else (lambda t: t)
    tparams, params, frozen = replicate(tparams), replicate(params), replicate(frozen)

    def continue_prompts(position: int, rkey):
        tokens, plen = prompt_batch(prompts, position, opts.batch_size, opts.seq_len)
        tokens, valid = rollout_jit(tparams, tcfg, place_batch(tokens), place_batch(plen), rkey,
                                    temperature=temperature)
        return tokens, valid, place_batch(plen)

    pool = None
    if method == "sft":  # the fixed dataset: generated once (deterministically, so a resume rebuilds it)
        # Default: one sequence per prompt, but never more than the run consumes (the rest costs target
        # tokens and is never trained on).
        size = opts.sft_sequences or (opts.batch_size * 16 if from_bos else min(len(prompts), steps * opts.batch_size))
        chunks = [continue_prompts(c, jax.random.fold_in(sft_key, c)) for c in range(0, size, opts.batch_size)]
        pool = [np.concatenate([np.asarray(c[n]) for c in chunks])[:size] for n in range(3)]

    def next_batch(state: TrainState):
        if pool is not None:
            rows = (state.data_position + np.arange(opts.batch_size)) % len(pool[0])
            return tuple(place_batch(a[rows]) for a in pool), state.rng
        rkey, sub = jax.random.split(state.rng)
        return continue_prompts(state.data_position, sub), rkey

    ckpt_dir = os.path.join(out_dir, "checkpoints")
    os.makedirs(out_dir, exist_ok=True)
    checkpointer = TrainCheckpointer(ckpt_dir, opts.save_every, opts.keep)
    state = TrainState(params, optimizer.init(params), 0, 0, data_key)
    history = {"step": [], "loss": [], "top1": [], "tokens_per_pass": [], "target_tokens": []}
    history_path = os.path.join(out_dir, "history.json")
    if not resume and checkpointer.latest_step() is not None:
        raise FileExistsError(f"{ckpt_dir} already holds checkpoints (step {checkpointer.latest_step()}): "
                              "resume them (--resume) or choose another output directory")
    if resume:
        restored = checkpointer.restore_latest(state)
        if restored is not None:
            state = dataclasses.replace(restored, params=replicate(restored.params),
                                        opt_state=replicate(restored.opt_state))
            if os.path.isfile(history_path):
                with open(history_path) as f:
                    old = json.load(f)["history"]
                n = sum(1 for s in old["step"] if s <= state.step)
                history = {k: list(v[:n]) for k, v in old.items()}
                history.setdefault("target_tokens", [])

    from tqdm.auto import tqdm

    bar = tqdm(total=steps, initial=state.step, desc=f"train {kind} ({method})", disable=not progress,
               file=sys.stderr, mininterval=2.0)
    ema = None
    while state.step < steps:
        (tokens, valid, plen), rng = next_batch(state)
        params, opt_state, loss, top1, tpp, verified = train_step(state.params, state.opt_state, frozen, tparams,
                                                                  tokens, valid, plen, spec=spec)
        spent = target_tokens_of_step(np.asarray(valid), int(verified), first_use=pool is None or
                                      state.data_position < len(pool[0]))
        state = TrainState(params, opt_state, state.step + 1, state.data_position + opts.batch_size, rng)
        row = [float(loss), float(top1), float(tpp)]
        for name, value in zip(("loss", "top1", "tokens_per_pass"), row):
            history[name].append(value)
        history["target_tokens"].append((history["target_tokens"][-1] if history["target_tokens"] else 0) + spent)
        history["step"].append(state.step)
        ema = row if ema is None else [0.9 * e + 0.1 * r for e, r in zip(ema, row)]
        bar.update(1)
        bar.set_postfix(loss=f"{ema[0]:.3f}", top1=f"{ema[1]:.2f}", tok_per_pass=f"{ema[2]:.2f}", refresh=False)
        if checkpointer.save(state, force=state.step == steps):
            _write_history(history_path, history, kind, method, opts)
    bar.close()
    checkpointer.close()
    _write_history(history_path, history, kind, method, opts)

    final = jax.device_get(state.params)
    if kind == "eagle3":
        config_path, weights_path = export_eagle3(out_dir, hf_config, final)
    else:
        config_path, weights_path = export_draft_model(out_dir, hf_config, final, target.path)
    plot_path = os.path.join(out_dir, "curves.png")
    if not plot_curves(plot_path, history):
        plot_path = None
    return TrainResult(history, final, out_dir, config_path, weights_path, plot_path, ckpt_dir)


def target_tokens_of_step(valid_lengths: np.ndarray, verified: int, first_use: bool) -> int:
    """Target forward tokens one train step costs: generating its rows (prompt prefill + one decode
    per generated token, paid once per sequence: sft's pool is generated once), the frozen target's
    pass over them for the teacher logits and features, and opd's verification of the drafter's own
    chains at the roots the loop visits (``verified``). Padding is not counted."""
    rows = int(np.sum(valid_lengths))
    return rows * (2 if first_use else 1) + verified


def _data_mesh(batch_size: int) -> Optional[Mesh]:
    """A 1-D ``data`` mesh over all devices when there are several and they divide the batch."""
    n = jax.device_count()
    if n == 1 or batch_size % n:
        return None
    return Mesh(np.asarray(jax.devices()), ("data",))


def _write_history(path: str, history: dict, kind: str, method: str, opts: TrainOptions) -> None:
    with open(path, "w") as f:
        json.dump({"kind": kind, "method": method, "options": dataclasses.asdict(opts), "history": history}, f)


def cli_main(args) -> int:
    """``specjax train-drafter``: load the target, train, print where everything went."""
    target_dir = args.target
    if target_dir is None:
        from specjax.models.embedded import default_model_dir

        target_dir = default_model_dir()
    target = load_model(target_dir, dtype=jnp.float32)
    prompts = encode_prompts(target, read_prompts_jsonl(args.prompts)) if args.prompts else None
    options = TrainOptions(batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, seed=args.seed,
                           ttt_steps=args.ttt_steps, feature_weight=args.feature_weight, opd_weight=args.opd_weight,
                           prompt_weight=args.prompt_weight, rollout_temperature=args.rollout_temperature,
                           save_every=args.save_every, keep=args.keep, draft_layers=args.draft_layers,
                           draft_hidden=args.draft_hidden)
    init = load_init_params(args.kind, args.init, target) if args.init else None
    result = train_drafter(target, args.kind, args.method, args.steps, args.out, prompts=prompts, options=options,
                           resume=args.resume, init_params=init)
    h = result.history
    print(f"trained {args.kind} ({args.method}) for {h['step'][-1] if h['step'] else 0} steps: final loss "
          f"{np.mean(h['loss'][-20:]):.4f}, top-1 agreement {np.mean(h['top1'][-20:]):.3f}, estimated chain "
          f"tokens/pass {np.mean(h['tokens_per_pass'][-20:]):.2f} (last 20 steps)")
    print(f"wrote {result.weights_path}, {result.config_path}" + (f", {result.plot_path}" if result.plot_path else ""))
    print(f"use it: specjax generate --drafter {'eagle3' if args.kind == 'eagle3' else 'draft-model'} "
          f"--drafter-model {result.out_dir}" + (f" --model {target_dir}" if args.target else ""))
    return 0
