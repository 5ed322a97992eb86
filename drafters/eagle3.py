"""EAGLE-3 draft head with EAGLE-2 dynamic trees, and loading of public EAGLE-3 checkpoints.

The head (Li et al., EAGLE-3): the target returns the hidden states of three
layers (by default 2, L/2 and L-3 in "after layer i" numbering, the inputs of
those decoder layers); ``fc`` fuses them (3H -> H). One decoder layer takes
``[input_layernorm(embed(token)), hidden_norm(h)]`` (attention input 2H, the
residual is ``h``), then the final ``norm`` and an LM head over a reduced draft
vocabulary whose ids map to target ids by ``target = draft + d2t[draft]``.

Alignment: the draft input at position j pairs the target's hidden state of
position j with token j + 1 and predicts token j + 2. While drafting, a node
is paired with its parent's *draft* output hidden state (the head feeds itself).

State: the head's one-layer KV cache holds true pairs for positions
``[0, dlen)`` with ``dlen`` the target's length (the last pair holds the root
token); ``root_hidden`` is the head's output there. ``update`` feeds the
accepted path's pairs (target features gathered by ``Accepted.path``) over the
scratch rows drafting wrote.

Checkpoint layout (SafeAILab EAGLE-3, as served by sglang / vLLM): ``config.json``
(Llama fields plus ``draft_vocab_size``, optional ``target_hidden_size``,
``norm_before_residual``, ``eagle_config.eagle_aux_hidden_state_layer_ids``) and
``model.safetensors`` with ``fc.weight``, ``midlayer.{input_layernorm,hidden_norm,
post_attention_layernorm}.weight``, ``midlayer.self_attn.{q,k,v,o}_proj.weight``,
``midlayer.mlp.{gate,up,down}_proj.weight``, ``norm.weight``, ``lm_head.weight``,
``d2t``, ``t2d`` and optionally ``embed_tokens.weight`` (else the target's).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from specjax.drafters import visual_compressor as vc
from specjax.drafters.device import (KeyedByConfig, TreeShape, build_dynamic_tree, pick_position, row_temperature,
                                     scan_chunks, scratch_attention, write_block)
from specjax.engine.steps import PREFILL_CHUNK
from specjax.engine.tree import DraftTree
from specjax.models.config import ModelConfig, UnsupportedModelError
from specjax.models.decoder import KVCache, causal_mask, rms_norm
from specjax.models.loading import Model
from specjax.models.rope import apply_rope, inverse_frequencies
from specjax.models.safetensors_io import CheckpointError, SafetensorsFile
from specjax.tpu_kernels.tree_attention import tree_attention

# EAGLE-2's defaults (total draft tokens, depth, top-k).
DEFAULT_CAPACITY, DEFAULT_DEPTH, DEFAULT_TOPK = 60, 7, 10

_LAYER_TENSORS = {
    "attn_norm": "midlayer.input_layernorm.weight", "hidden_norm": "midlayer.hidden_norm.weight",
    "mlp_norm": "midlayer.post_attention_layernorm.weight",
    "wq": "midlayer.self_attn.q_proj.weight", "wk": "midlayer.self_attn.k_proj.weight",
    "wv": "midlayer.self_attn.v_proj.weight", "wo": "midlayer.self_attn.o_proj.weight",
    "w_gate": "midlayer.mlp.gate_proj.weight", "w_up": "midlayer.mlp.up_proj.weight",
    "w_down": "midlayer.mlp.down_proj.weight",
}
CONVERT_BIN = ("python -c \"import torch, safetensors.torch as st; st.save_file({k: v.contiguous() for k, v in "
               "torch.load('pytorch_model.bin', map_location='cpu', weights_only=True).items()}, "
               "'model.safetensors')\"")


@dataclasses.dataclass(frozen=True)
class Eagle3Config:
    """The head's shape. ``layer`` describes its attention/MLP (a one-layer Llama config)."""

    layer: ModelConfig
    draft_vocab_size: int
    target_hidden_size: int
    norm_before_residual: bool = False
    aux_layer_ids: Optional[tuple[int, ...]] = None  # from the checkpoint, if it names them
    compressor: Optional[vc.CompressorConfig] = None  # a vision-language target's visual compressor

    @property
    def hidden_size(self) -> int:
        return self.layer.hidden_size

    @classmethod
    def from_hf(cls, hf: dict) -> "Eagle3Config":
        hf = dict(hf)
        hf.setdefault("model_type", "llama")
        if hf["model_type"] != "llama":
            raise UnsupportedModelError(f"EAGLE-3 head model_type {hf['model_type']!r}: only 'llama' heads exist")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise UnsupportedModelError("EAGLE-3 heads with attention or MLP biases are not supported")
        for name in ("hidden_size", "num_attention_heads", "intermediate_size", "vocab_size"):
            if name not in hf:
                raise CheckpointError(f"EAGLE-3 config.json lacks {name!r}")
        layer = ModelConfig.from_hf({**hf, "num_hidden_layers": 1})
        eagle = hf.get("eagle_config") or {}
        aux = eagle.get("eagle_aux_hidden_state_layer_ids")
        return cls(layer=layer, draft_vocab_size=int(hf.get("draft_vocab_size") or hf["vocab_size"]),
                   target_hidden_size=int(hf.get("target_hidden_size") or hf["hidden_size"]),
                   norm_before_residual=bool(hf.get("norm_before_residual", False)),
                   aux_layer_ids=None if aux is None else tuple(int(i) for i in aux),
                   compressor=vc.CompressorConfig.from_hf(hf.get("visual_compressor")))


def default_hidden_layers(num_target_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's feature layers (2, L/2, L-3), as inputs of those layers = "after layer i"."""
    return (2, num_target_layers // 2, num_target_layers - 3)


def param_shapes(cfg: Eagle3Config) -> dict:
    h, d = cfg.hidden_size, cfg.layer.head_dim
    q_out, kv_out, inter = cfg.layer.num_heads * d, cfg.layer.num_kv_heads * d, cfg.layer.intermediate_size
    return {
        "fc": (h, 3 * cfg.target_hidden_size), "embed": (cfg.layer.vocab_size, h),
        "layer": {"attn_norm": (h,), "hidden_norm": (h,), "mlp_norm": (h,), "wq": (q_out, 2 * h),
                  "wk": (kv_out, 2 * h), "wv": (kv_out, 2 * h), "wo": (h, q_out),
                  "w_gate": (inter, h), "w_up": (inter, h), "w_down": (h, inter)},
        "final_norm": (h,), "lm_head": (cfg.draft_vocab_size, h), "d2t": (cfg.draft_vocab_size,),
        **({} if cfg.compressor is None else {"compressor": vc.param_shapes(cfg.compressor, h)}),
    }


def init_params(cfg: Eagle3Config, key: jax.Array, dtype=jnp.float32, scale: float = 0.1) -> dict:
    """Random head params (norms at 1, d2t = a random sorted subset of the target vocab)."""
    shapes = param_shapes(cfg)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(flat) + 1)
    leaves = []
    for (path, shape), k in zip(flat, keys):
        name = path[-1].key
        if name == "d2t":
            leaves.append(jnp.asarray(d2t_from_ids(np.asarray(jax.random.choice(
                keys[-1], cfg.layer.vocab_size, (cfg.draft_vocab_size,), replace=False)))))
        elif name.endswith("norm"):
            leaves.append(jnp.ones(shape, dtype))
        else:
            leaves.append((scale * jax.random.normal(k, shape)).astype(dtype))
    params = jax.tree_util.tree_unflatten(treedef, leaves)
    if cfg.compressor is not None:  # conv and resampler start as the average pool
        params["compressor"] = jax.tree.map(lambda x: x.astype(dtype), vc.init_params(
            cfg.compressor, cfg.hidden_size, keys[-1], scale))
    return params


def d2t_from_ids(target_ids: np.ndarray) -> np.ndarray:
    """The offsets ``d2t`` for a draft vocabulary made of these target ids (kept in id order)."""
    ids = np.sort(np.asarray(target_ids, np.int64))
    return (ids - np.arange(len(ids))).astype(np.int32)


# ------------------------------------------------------------------ the head's equations


def fuse_features(params, hidden: jax.Array) -> jax.Array:
    """[3, ..., Ht] target hidden states -> [..., H] via fc over their concatenation."""
    stacked = jnp.concatenate([hidden[i] for i in range(hidden.shape[0])], axis=-1)
    return jnp.einsum("...i,oi->...o", stacked.astype(params["fc"].dtype), params["fc"])


def _qkv(cfg: Eagle3Config, lp, tokens_emb, feats, positions):
    """The layer's input (2H) and its rotated q, k and v; returns the residual too."""
    b, t, _ = feats.shape
    eps, lc = cfg.layer.rms_norm_eps, cfg.layer
    normed = rms_norm(feats, lp["hidden_norm"], eps)
    residual = normed if cfg.norm_before_residual else feats
    x = jnp.concatenate([rms_norm(tokens_emb, lp["attn_norm"], eps), normed], axis=-1)
    lin = lambda w: jnp.einsum("...i,oi->...o", x, w)
    q = lin(lp["wq"]).reshape(b, t, lc.num_heads, lc.head_dim)
    k = lin(lp["wk"]).reshape(b, t, lc.num_kv_heads, lc.head_dim)
    v = lin(lp["wv"]).reshape(b, t, lc.num_kv_heads, lc.head_dim)
    inv_freq = inverse_frequencies(lc.rope, lc.head_dim)
    return residual, apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v


def _finish(cfg: Eagle3Config, lp, residual, attn_out):
    b, t = attn_out.shape[:2]
    x = residual + jnp.einsum("...i,oi->...o", attn_out.reshape(b, t, -1).astype(residual.dtype), lp["wo"])
    h = rms_norm(x, lp["mlp_norm"], cfg.layer.rms_norm_eps)
    up = jax.nn.silu(jnp.einsum("...i,oi->...o", h, lp["w_gate"])) * jnp.einsum("...i,oi->...o", h, lp["w_up"])
    return x + jnp.einsum("...i,oi->...o", up, lp["w_down"])


def draft_logits(cfg: Eagle3Config, params, hidden: jax.Array) -> jax.Array:
    """fp32 logits over the draft vocabulary of the head's output hidden states."""
    x = rms_norm(hidden, params["final_norm"], cfg.layer.rms_norm_eps)
    return jnp.einsum("...h,vh->...v", x, params["lm_head"], preferred_element_type=jnp.float32)


def head_block(cfg: Eagle3Config, params, cache: KVCache, lengths, tokens, feats, valid, *,
               attention: str = "xla") -> tuple[jax.Array, KVCache]:
    """Feed t causal pairs (token ids [B, t], fused features [B, t, H]) at slots and positions
    ``[lengths[b], lengths[b] + t)``; the first ``valid[b]`` are real. Returns output hidden [B, t, H]."""
    b, t = tokens.shape
    lp = params["layer"]
    positions = lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    residual, q, k, v = _qkv(cfg, lp, params["embed"][tokens], feats, positions)
    k, v = k.astype(cache.k.dtype), v.astype(cache.v.dtype)
    out = tree_attention(q, cache.k, cache.v, lengths, k, v, causal_mask(b, t, valid), impl=attention,
                         layer=jnp.int32(0))
    cache = KVCache(write_block(cache.k, k[None], lengths), write_block(cache.v, v[None], lengths))
    return _finish(cfg, lp, residual, out), cache


def head_scratch(cfg: Eagle3Config, params, cache: KVCache, tokens, feats, positions, lengths, scratch_mask,
                 write_starts):
    """Feed t pairs that see the prefix ``[0, lengths[b])``, the scratch slots ``lengths[b] + j`` where
    ``scratch_mask`` [B, t, M], and themselves (tree drafting)."""
    lp = params["layer"]
    residual, q, k, v = _qkv(cfg, lp, params["embed"][tokens], feats, positions)
    k, v = k.astype(cache.k.dtype), v.astype(cache.v.dtype)
    out = scratch_attention(q, cache.k, cache.v, jnp.int32(0), lengths, scratch_mask, k, v)
    cache = KVCache(write_block(cache.k, k[None], write_starts), write_block(cache.v, v[None], write_starts))
    return _finish(cfg, lp, residual, out), cache


# ------------------------------------------------------------------ the drafter


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Eagle3State:
    cache: KVCache  # [1, B, Hkv, S, D]
    lengths: jax.Array  # int32[B] true pairs cached (= the target's length)
    root_hidden: jax.Array  # [B, H] the head's output at the last true pair


@dataclasses.dataclass(eq=False)
class Eagle3Drafter(KeyedByConfig):
    """EAGLE-3 head drafting EAGLE-2 dynamic trees (defaults: T = 60, depth 7, top-k 10)."""

    state_fields = ("params",)

    cfg: Eagle3Config
    params: dict
    target_num_layers: int
    capacity: int = DEFAULT_CAPACITY
    topk: int = DEFAULT_TOPK
    depth: int = DEFAULT_DEPTH
    hidden_layers: Optional[tuple[int, ...]] = None
    attention: str = "xla"
    prefill_chunk: int = PREFILL_CHUNK  # prompt pairs fed per chunk at prefill (memory O(chunk x block))
    visual_mode: Optional[str] = None  # the compressor's operator (``visual_compressor.MODES``; None: the config's)

    def __post_init__(self):
        if self.cfg.compressor is None and self.visual_mode not in (None, "none"):
            raise ValueError(f"visual_mode {self.visual_mode!r} needs a head with a visual compressor")
        if self.visual_mode is not None and self.visual_mode not in vc.MODES:
            raise ValueError(f"visual_mode must be one of {vc.MODES}, got {self.visual_mode!r}")
        if self.hidden_layers is None:
            self.hidden_layers = self.cfg.aux_layer_ids or default_hidden_layers(self.target_num_layers)
        self.hidden_layers = tuple(int(i) for i in self.hidden_layers)
        bad = [i for i in self.hidden_layers if not 0 <= i <= self.target_num_layers]
        if len(self.hidden_layers) != 3 or bad:
            raise ValueError(f"EAGLE-3 needs 3 target layers in [0, {self.target_num_layers}], "
                             f"got {self.hidden_layers}")
        if self.topk > self.cfg.draft_vocab_size:
            raise ValueError(f"topk {self.topk} exceeds the draft vocabulary ({self.cfg.draft_vocab_size})")
        self.shape = TreeShape(self.capacity, self.topk, self.depth)

    def init_state(self, batch_size: int, max_len: int) -> Eagle3State:
        slots = max_len + max(self.shape.scratch_rows, self.shape.depth + 1) + 1
        cache = KVCache.zeros(self.cfg.layer, batch_size, slots, self.params["fc"].dtype)
        return Eagle3State(cache, jnp.zeros(batch_size, jnp.int32),
                           jnp.zeros((batch_size, self.cfg.hidden_size), self.params["fc"].dtype))

    @property
    def compression(self) -> Optional[str]:
        """The visual compressor's operator at prefill, or None (a text head, or mode "none")."""
        comp = self.cfg.compressor
        mode = self.visual_mode or (comp.mode if comp is not None else None)
        return None if mode in (None, "none") else mode

    def prefill(self, params, dstate: Eagle3State, prompt_tokens, prompt_lengths, first_tokens,
                hidden) -> Eagle3State:
        """Pairs (h_j, token_{j+1}) for every prompt position, in chunks of ``prefill_chunk`` pairs
        through the blockwise attention; the last one holds the root. With a visual compressor the
        image run's pairs are first replaced by its compressed tokens (``visual_compressor.compact``):
        the head's lengths then count the compacted sequence."""
        b = prompt_tokens.shape[0]
        shifted = jnp.concatenate([prompt_tokens[:, 1:], jnp.zeros((b, 1), prompt_tokens.dtype)], axis=1)
        shifted = shifted.at[jnp.arange(b), prompt_lengths - 1].set(first_tokens.astype(shifted.dtype))
        lengths = prompt_lengths.astype(jnp.int32)
        fused = fuse_features(params, hidden)
        if self.compression is not None:
            comp = self.cfg.compressor
            span = vc.image_span(comp, prompt_tokens, lengths)
            compressed = vc.compressed_tokens(comp, params["compressor"], fused, span, lengths, self.compression)
            fused, (shifted,) = vc.compact(span, comp.kept, compressed, fused, [shifted])
            lengths = lengths - span.removed

        def feed(carry, start, tokens, feats):
            cache, root = carry
            valid = jnp.clip(lengths - start, 0, tokens.shape[1])
            out, cache = head_block(self.cfg, params, cache, jnp.full(b, start), tokens, feats, valid,
                                    attention=self.attention)
            return cache, pick_position(out, lengths - 1 - start, root)

        carry = (dstate.cache, jnp.zeros_like(dstate.root_hidden))
        cache, root = scan_chunks(feed, carry, (shifted, fused), self.prefill_chunk)
        return Eagle3State(cache, lengths, root)

    def propose(self, params, dstate: Eagle3State, root_tokens, lengths, sampling, key, *,
                with_q: bool = False) -> tuple[DraftTree, Eagle3State]:
        b = dstate.lengths.shape[0]
        m = max(self.shape.scratch_rows, 1)
        d2t = params["d2t"].astype(jnp.int32)
        targets = jnp.arange(d2t.shape[0], dtype=jnp.int32) + d2t
        vocab = self.cfg.layer.vocab_size

        def expand(cache, tokens, feats, positions, offset, scratch_mask):
            own = jax.nn.one_hot(offset + jnp.arange(tokens.shape[1]), m, dtype=bool)[None]
            out, cache = head_scratch(self.cfg, params, cache, tokens, feats, positions, dstate.lengths,
                                      scratch_mask & ~own, dstate.lengths + offset)
            return draft_logits(self.cfg, params, out), out, cache

        def q_to_target(q):
            return jnp.zeros(q.shape[:-1] + (vocab,), q.dtype).at[..., targets].set(q)

        tree, cache = build_dynamic_tree(expand, dstate.cache, draft_logits(self.cfg, params, dstate.root_hidden),
                                         dstate.root_hidden, dstate.lengths, self.shape,
                                         row_temperature(sampling, b), key, lengths,
                                         to_target=lambda ids: ids + d2t[ids], q_to_target=q_to_target,
                                         target_vocab=vocab, with_q=with_q)
        return tree, dataclasses.replace(dstate, cache=cache)

    def update(self, params, dstate: Eagle3State, accepted, aux) -> Eagle3State:
        """Feed the accepted path's true pairs (target features of path node j, emitted token j)."""
        n = self.shape.depth + 1  # at most depth + 1 tokens are emitted per step
        path = accepted.path[:, :n]
        feats = jnp.take_along_axis(aux.hidden, path[None, :, :, None], axis=2)  # [3, B, n, H]
        return self._feed(params, dstate, accepted.tokens[:, :n], feats, accepted.num)

    catch_up_reads_hidden = True  # the device loop keeps plain steps' features for ``catch_up``

    def catch_up(self, params, dstate: Eagle3State, tokens: jax.Array, num: jax.Array,
                 hidden: jax.Array) -> Eagle3State:
        """Feed the pairs plain steps left (their emitted tokens, the target's features ``hidden``
        [3, B, n, H] of the positions before them) in one block: under the auto size a plain step
        only keeps its features, cheaper than the head's layer per step."""
        return self._feed(params, dstate, tokens, hidden, num)

    def _feed(self, params, dstate: Eagle3State, tokens, hidden, num) -> Eagle3State:
        out, cache = head_block(self.cfg, params, dstate.cache, dstate.lengths, tokens, fuse_features(params, hidden),
                                num, attention=self.attention)
        last = jnp.take_along_axis(out, jnp.maximum(num - 1, 0)[:, None, None], axis=1)[:, 0]
        fed = (num > 0)[:, None]
        return Eagle3State(cache, dstate.lengths + num, jnp.where(fed, last, dstate.root_hidden))

    def end_batch(self, dstate) -> None:
        return None

    def take_rows(self, dstate: Eagle3State, index: jax.Array) -> Eagle3State:
        """The head's cache and root features of batch rows ``index``."""
        return Eagle3State(dstate.cache.take_rows(index), dstate.lengths[index], dstate.root_hidden[index])


# ------------------------------------------------------------------ loading


def load_eagle3(model_dir: str, target: Model, dtype=jnp.bfloat16, **drafter_args) -> Eagle3Drafter:
    """An ``Eagle3Drafter`` from a public EAGLE-3 checkpoint directory, for this target."""
    if not os.path.isdir(model_dir):
        raise CheckpointError(f"EAGLE-3 directory {model_dir!r} does not exist")
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{model_dir}: no config.json (is this an EAGLE-3 checkpoint directory?)")
    with open(config_path) as f:
        try:
            cfg = Eagle3Config.from_hf(json.load(f))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_path}: not valid JSON: {e}") from e
    tcfg = target.config
    if cfg.layer.vocab_size != tcfg.vocab_size:
        raise ValueError(f"EAGLE-3 head vocab_size {cfg.layer.vocab_size} != target vocab_size {tcfg.vocab_size}")
    if cfg.target_hidden_size != tcfg.hidden_size:
        raise ValueError(f"EAGLE-3 head expects target hidden size {cfg.target_hidden_size}, "
                         f"the target has {tcfg.hidden_size}")
    tensors = _open_head_weights(model_dir)
    np_dtype = np.dtype(jnp.dtype(dtype))
    shapes = param_shapes(cfg)

    def read(name, shape):
        if name not in tensors:
            raise CheckpointError(f"{model_dir}: missing tensor {name!r}")
        arr = tensors[name].tensor(name)
        if tuple(arr.shape) != tuple(shape):
            raise CheckpointError(f"{model_dir}: tensor {name!r} has shape {arr.shape}, config implies {shape}")
        return arr

    params = {"fc": read("fc.weight", shapes["fc"]).astype(np_dtype),
              "layer": {k: read(n, shapes["layer"][k]).astype(np_dtype) for k, n in _LAYER_TENSORS.items()},
              "final_norm": read("norm.weight", shapes["final_norm"]).astype(np_dtype),
              "lm_head": read("lm_head.weight", shapes["lm_head"]).astype(np_dtype)}
    if "embed_tokens.weight" in tensors:
        params["embed"] = read("embed_tokens.weight", shapes["embed"]).astype(np_dtype)
    elif tcfg.hidden_size == cfg.hidden_size:  # share the target's table (no copy when dtypes agree)
        params["embed"] = target.params["embed"].astype(dtype)
    else:
        raise CheckpointError(f"{model_dir}: no embed_tokens.weight and the target's embedding has hidden size "
                              f"{tcfg.hidden_size}, the head {cfg.hidden_size}")
    if cfg.compressor is not None:
        params["compressor"] = {k: read(f"visual_compressor.{k}", shape).astype(np_dtype)
                                for k, shape in shapes["compressor"].items()}
    d2t = read("d2t", shapes["d2t"]).astype(np.int64)
    mapped = np.arange(len(d2t)) + d2t
    if mapped.min() < 0 or mapped.max() >= tcfg.vocab_size:
        raise CheckpointError(f"{model_dir}: d2t maps draft ids outside the target vocab [0, {tcfg.vocab_size})")
    if "t2d" in tensors:
        read("t2d", (tcfg.vocab_size,))
    params["d2t"] = d2t.astype(np.int32)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return Eagle3Drafter(cfg, params, tcfg.num_layers, **drafter_args)


def _open_head_weights(model_dir: str) -> dict[str, SafetensorsFile]:
    names = sorted(os.listdir(model_dir))
    files = [n for n in names if n.endswith(".safetensors")]
    if not files:
        if any(n.endswith((".bin", ".pt", ".pth")) for n in names):
            raise CheckpointError(
                f"{model_dir}: only PyTorch pickle weights (pytorch_model.bin) found; specjax never unpickles. "
                f"Convert once, inside that directory: {CONVERT_BIN}")
        raise CheckpointError(f"{model_dir}: no *.safetensors weights")
    out: dict[str, SafetensorsFile] = {}
    for fn in files:
        f = SafetensorsFile(os.path.join(model_dir, fn))
        out.update({name: f for name in f.keys()})
    return out

