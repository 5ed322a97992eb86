"""Training plumbing shared by every specjax trainer: optimizer, exact-resume checkpoints, outputs.

- ``make_optimizer``: AdamW with linear warmup + cosine decay and global-norm
  clipping (optax), the recipe of the embedded model and of drafter training.
- ``TrainCheckpointer``: an orbax ``CheckpointManager`` saving a ``TrainState``
  (params, optimizer state, step, data position, PRNG key) every ``save_every``
  steps, keeping the newest ``keep``. Everything a step depends on is saved, so a
  run resumed from a checkpoint produces bitwise the same params as one that
  never stopped (on the same platform).
- ``save_safetensors``: weights as a shareable safetensors file (no pickles).
- ``llama_hf_config`` / ``export_llama`` / ``save_tokenizer_files``: a trained Llama (the
  shipped models, draft models) as a Hugging Face directory that ``load_model`` and
  ``transformers`` both read; ``save_hf_checkpoint`` writes any config + tensors pair.
- ``plot_curves``: loss / acceptance curves as a PNG (matplotlib, optional).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from specjax.models.config import ModelConfig
from specjax.models.loading import hf_tensor_name


def make_optimizer(lr: float, total_steps: int, warmup_steps: int, weight_decay: float = 0.01,
                   clip: float = 1.0, end_lr_fraction: float = 0.05) -> optax.GradientTransformation:
    """AdamW (b2 = 0.95) at peak ``lr`` after ``warmup_steps`` of linear warmup, cosine-decayed to
    ``end_lr_fraction * lr`` at ``total_steps``; gradients clipped to global norm ``clip``."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, total_steps, end_value=lr * end_lr_fraction)
    return optax.chain(optax.clip_by_global_norm(clip),
                       optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=weight_decay))


@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a training step depends on.

    ``data_position`` counts the examples (or batches: the trainer decides) consumed,
    so a resumed run draws exactly the data the uninterrupted run would have drawn.
    ``rng`` is a typed key (``jax.random.key``) or a raw uint32 key array.
    """

    params: Any
    opt_state: Any
    step: int = 0
    data_position: int = 0
    rng: Any = None


def _is_typed_key(x) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


class TrainCheckpointer:
    """Saves a ``TrainState`` every ``save_every`` steps into ``directory``, keeping ``keep``.

    The optimizer state is saved as its list of leaves and rebuilt on restore with
    the template's tree structure (optax states are namedtuples, some empty, which
    a generic checkpoint format need not preserve).
    """

    def __init__(self, directory: str, save_every: int, keep: int = 2):
        import orbax.checkpoint as ocp

        if save_every < 1 or keep < 1:
            raise ValueError(f"save_every and keep must be >= 1, got {save_every} and {keep}")
        self._ocp = ocp
        self.directory = os.path.abspath(directory)
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def _payload(self, state: TrainState) -> dict:
        rng = state.rng
        return {"params": state.params,
                "opt_state": list(jax.tree.leaves(state.opt_state)),
                "step": np.int64(state.step), "data_position": np.int64(state.data_position),
                "rng": np.asarray(jax.random.key_data(rng) if _is_typed_key(rng) else
                                  (np.zeros(0, np.uint32) if rng is None else rng))}

    def save(self, state: TrainState, force: bool = False) -> bool:
        """Save if ``state.step`` is a multiple of ``save_every`` (or ``force``); True if saved."""
        if not force and state.step % self.save_every:
            return False
        ocp = self._ocp
        saved = self._manager.save(state.step, args=ocp.args.Composite(state=ocp.args.StandardSave(
            self._payload(state))), force=True)
        self._manager.wait_until_finished()
        return bool(saved)

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def restore_latest(self, template: TrainState) -> Optional[TrainState]:
        """The newest saved state, shaped like ``template`` (fresh params / optimizer state /
        key of the same structure), or None when nothing was saved yet."""
        step = self._manager.latest_step()
        if step is None:
            return None
        ocp = self._ocp
        target = jax.tree.map(np.asarray, self._payload(template))
        restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        got = restored["state"]
        opt_leaves = [jnp.asarray(x) for x in got["opt_state"]]
        opt_state = jax.tree.unflatten(jax.tree.structure(template.opt_state), opt_leaves)
        rng = template.rng
        if _is_typed_key(rng):
            rng = jax.random.wrap_key_data(jnp.asarray(got["rng"]), impl=jax.random.key_impl(rng))
        elif rng is not None:
            rng = jnp.asarray(got["rng"])
        return TrainState(params=jax.tree.map(jnp.asarray, got["params"]), opt_state=opt_state,
                          step=int(got["step"]), data_position=int(got["data_position"]), rng=rng)

    def close(self) -> None:
        self._manager.close()


def save_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: Optional[dict] = None) -> None:
    """Write a flat {name: array} dict as one safetensors file (arrays made contiguous)."""
    from safetensors.numpy import save_file

    bad = [k for k, v in tensors.items() if not isinstance(v, np.ndarray)]
    if bad:
        raise TypeError(f"save_safetensors wants numpy arrays; not arrays: {bad[:5]}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path,
              metadata={"format": "pt", **(metadata or {})})


def llama_hf_config(cfg: ModelConfig, architecture: str = "LlamaForCausalLM", **fields: Any) -> dict:
    """A Hugging Face ``config.json`` dict of a Llama of ``cfg``'s shape (SiLU, no biases, bf16), with
    ``fields`` (token ids, tied embeddings, a drafter's own keys) before ``torch_dtype``.

    Written as ``llama`` whatever ``cfg.model_type``: what specjax trains is a Llama; a
    target's config only lends its shape, vocabulary and RoPE."""
    rope = cfg.rope
    config = {"architectures": [architecture], "model_type": "llama", "vocab_size": cfg.vocab_size,
              "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
              "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
              "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
              "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
              "rope_theta": rope.theta, "attention_bias": False, "mlp_bias": False}
    if rope.kind != "default":
        config["rope_scaling"] = {"rope_type": rope.kind, "factor": rope.factor,
                                  "low_freq_factor": rope.low_freq_factor, "high_freq_factor": rope.high_freq_factor,
                                  "original_max_position_embeddings": rope.original_max_position}
    return {**config, **fields, "torch_dtype": "bfloat16"}


def to_bf16(x) -> np.ndarray:
    """A weight as a bfloat16 numpy array (the dtype every exported checkpoint here stores)."""
    import ml_dtypes

    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16)


def llama_hf_tensors(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A specjax Llama param pytree as {Hugging Face tensor name: bf16 array}, the layers unstacked."""
    out = {}
    for key, value in params.items():
        if key == "layers":
            for name, stacked in value.items():
                arr = np.asarray(stacked, np.float32)
                for i in range(arr.shape[0]):
                    out[hf_tensor_name(("layers", name), i)] = to_bf16(arr[i])
        else:
            out[hf_tensor_name((key,))] = to_bf16(value)
    return out


def save_hf_checkpoint(out_dir: str, hf_config: Mapping[str, Any],
                       tensors: Mapping[str, np.ndarray]) -> tuple[str, str]:
    """``config.json`` + ``model.safetensors`` in ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    config_path, weights_path = os.path.join(out_dir, "config.json"), os.path.join(out_dir, "model.safetensors")
    with open(config_path, "w") as f:
        json.dump(hf_config, f, indent=2)
    save_safetensors(weights_path, tensors)
    return config_path, weights_path


def export_llama(out_dir: str, params: Mapping[str, Any], hf_config: Mapping[str, Any]) -> tuple[str, str]:
    """A trained Llama as a Hugging Face directory: ``hf_config`` (from ``llama_hf_config``) and the
    params in bf16; returns the config and weights paths."""
    return save_hf_checkpoint(out_dir, hf_config, llama_hf_tensors(params))


def save_tokenizer_files(out_dir: str, tokenizer, hf_config: Mapping[str, Any], eos_token: str,
                         pad_token: str) -> None:
    """``tokenizer.json``, ``tokenizer_config.json`` and a greedy ``generation_config.json`` next to an
    exported model whose BOS is its EOS (``eos_token``), as the shipped models' tokenizers have it."""
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": hf_config["bos_token_id"], "eos_token_id": hf_config["eos_token_id"],
                   "pad_token_id": hf_config["pad_token_id"], "do_sample": False}, f, indent=2)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos_token, "pad_token": pad_token,
                   "bos_token": eos_token, "model_max_length": hf_config["max_position_embeddings"]}, f, indent=2)


def plot_curves(path_png: str, history: Mapping[str, Sequence[float]], x_key: str = "step") -> bool:
    """One panel per curve in ``history`` (x axis: ``history[x_key]`` if present, else the index).

    matplotlib is optional (a test extra): without it, print why and return False."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path_png} (pip install matplotlib)",
              file=sys.stderr)
        return False
    names = [k for k in history if k != x_key and len(history[k])]
    if not names:
        return False
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 2.6 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        ys = np.asarray(history[name], np.float64)
        xs = np.asarray(history[x_key])[: len(ys)] if x_key in history else np.arange(len(ys))
        ax.plot(xs, ys, lw=1.2)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel(x_key)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path_png)), exist_ok=True)
    fig.savefig(path_png, dpi=100)
    plt.close(fig)
    return True


def add_decoder_args(parser, *, hidden_size: int, intermediate_size: int, num_layers: int, num_heads: int,
                     num_kv_heads: int) -> None:
    """The Llama shape flags of a training script (defaults: the shape of the checkpoint it ships)."""
    for flag, default in (("--hidden-size", hidden_size), ("--intermediate-size", intermediate_size),
                          ("--num-layers", num_layers), ("--num-heads", num_heads), ("--num-kv-heads", num_kv_heads)):
        parser.add_argument(flag, type=int, default=default)


def add_optimizer_args(parser, *, steps: int, batch_size: int, lr: float, warmup: int, weight_decay: float = 0.01,
                       batch_help: Optional[str] = None) -> None:
    """A training script's ``make_optimizer`` and batch flags (defaults: the shipped checkpoint's run)."""
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=batch_size, help=batch_help)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--weight-decay", type=float, default=weight_decay)


def check_run_args(checkpoint_dir: str, run_args: dict, resume: bool) -> None:
    """A resumed run must use the arguments it started with; a fresh one must not reuse a directory."""
    path = os.path.join(checkpoint_dir, "run_args.json")
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        if not resume:
            raise SystemExit(f"{checkpoint_dir} holds checkpoints of an earlier run: pass --resume to continue "
                             "it, or delete the directory to start over")
        if saved != run_args:
            diff = {k: (saved.get(k), v) for k, v in run_args.items() if saved.get(k) != v}
            raise SystemExit(f"--resume with different arguments than the checkpointed run (saved, now): {diff}")
        return
    os.makedirs(checkpoint_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(run_args, f, indent=2)
