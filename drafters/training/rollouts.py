"""The forwards drafter training runs: the target's rollouts and the unrolled drafters.

EAGLE-3 training-time test (TTT, Li et al.): the head is unrolled ``k`` steps
exactly as it drafts a chain. Unroll step 0 at position j pairs the fused
target features of position j with token j + 1 (the alignment in
``eagle3.py``); unroll step i > 0 at chain j feeds the head its *own* output
hidden of step i - 1 (as a draft node is paired with its parent's draft output
hidden) with token j + 1 + i, at RoPE position j + i, attending to the step-0
pairs at positions <= j and to its own chain's steps 1..i (its tree ancestors).
Step i at chain j predicts token j + 2 + i: its teacher is the target's
distribution at position j + 1 + i (the logits that verify that draft node).

Draft-OPD replays the head's own chains (``unroll_own_chain``) and has the
target verify them (``target_chain_logits``); the draft model trains through a
cacheless causal forward (``causal_logits``).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from specjax.drafters.eagle3 import Eagle3Config, _finish, _qkv, draft_logits
from specjax.engine.sampling import first_argmax
from specjax.models.config import ModelConfig
from specjax.models.decoder import (KVCache, causal_mask, forward, linear, lm_head, mlp_block, qkv_projection,
                                    rms_norm)
from specjax.models.rope import inverse_frequencies


# ------------------------------------------------------------------ the target's rollouts


def rollout(params, cfg: ModelConfig, tokens: jax.Array, prompt_lengths: jax.Array, key: jax.Array,
            temperature: float, input_embeds: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """Continue each right-padded prompt with the target up to the buffer's width [B, S].
    ``input_embeds`` [B, S, H]: the prompts' embeddings (a vision-language prompt's, images merged).

    Returns the filled tokens and each row's valid length (through its first generated EOS)."""
    b, s = tokens.shape
    cache = KVCache.zeros(cfg, b, s + 1, params["embed"].dtype)
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    out = forward(params, cfg, tokens, positions, cache, jnp.zeros(b, jnp.int32),
                  causal_mask(b, s, prompt_lengths), input_embeds=input_embeds)
    logits = jnp.take_along_axis(out.logits, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]
    eos = jnp.asarray(cfg.eos_token_ids or (-1,), jnp.int32)

    def pick(key, logits):
        if temperature == 0.0:
            return first_argmax(logits)
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
    a = first_argmax(logits)
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
