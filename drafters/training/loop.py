"""The training loop: prompts, batches from the target's rollouts, checkpoints, and ``specjax train-drafter``."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from specjax.drafters.eagle3 import default_hidden_layers
from specjax.drafters.training.export import (checked_init_params, draft_model_hf_config, eagle3_hf_config,
                                              export_draft_model, export_eagle3, init_draft_model, init_eagle3,
                                              load_init_params)
from specjax.drafters.training.losses import StepSpec, make_optimizer_for, train_step
from specjax.drafters.training.options import KINDS, METHODS, TrainOptions
from specjax.drafters.training.rollouts import rollout_jit
from specjax.drafters.visual_compressor import CompressorConfig
from specjax.models.config import ModelConfig
from specjax.models.image_processing import ImageProcessorConfig, preprocess
from specjax.models.loading import Model, load_model
from specjax.models.multimodal import input_embeddings
from specjax.models.training import TrainCheckpointer, TrainState, plot_curves


@dataclasses.dataclass
class TrainResult:
    history: dict
    params: dict  # the final trained params (float32)
    out_dir: str
    config_path: str
    weights_path: str
    plot_path: Optional[str]
    checkpoint_dir: str


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


def read_image_prompts_jsonl(path: str) -> tuple[list[str], list[np.ndarray]]:
    """The ``"prompt"`` and ``"image"`` (a file path, relative to the JSONL file's folder) of every line."""
    from PIL import Image

    texts, images = [], []
    folder = os.path.dirname(os.path.abspath(path))
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(
                    row.get("image"), str):
                raise ValueError(f"{path}:{n}: expected an object with string fields \"prompt\" and \"image\"")
            image_path = os.path.join(folder, row["image"])
            if not os.path.isfile(image_path):
                raise ValueError(f"{path}:{n}: image {image_path!r} does not exist")
            texts.append(row["prompt"])
            images.append(np.asarray(Image.open(image_path).convert("RGB")))
    if not texts:
        raise ValueError(f"{path}: no prompts")
    return texts, images


def encode_image_prompt_ids(vlm, texts: Sequence[str]) -> list[list[int]]:
    """Token ids with the image placeholder expanded (a prompt without one gets the image first)."""
    from specjax.models.multimodal import placed_image_tokens

    return [placed_image_tokens(vlm.tokenizer.encode(text).ids, 1, vlm.config) for text in texts]


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


def train_drafter(target, kind: str, method: str, steps: int, out_dir: str, *,
                  prompts: Optional[Sequence[Sequence[int]]] = None, options: TrainOptions = TrainOptions(),
                  resume: bool = False, progress: bool = True, init_params: Optional[dict] = None,
                  images: Optional[Sequence[np.ndarray]] = None,
                  on_checkpoint: Optional[Callable[[int, dict], None]] = None) -> TrainResult:
    """Train an EAGLE-3 head (``kind="eagle3"``) or a draft model for ``target`` (see the package
    docstring); ``prompts`` are token-id lists (None: sequences sampled from the target at BOS).
    ``init_params`` (the trainable params of a drafter of the same shape, e.g. ``load_init_params``)
    replace the random initialization: fine-tuning a trained drafter, or continuing it with another
    method. A resumed checkpoint takes precedence over it.

    A vision-language ``target`` (``multimodal.load_vlm``) takes one image per prompt (``images``,
    uint8 [H, W, 3] arrays; the prompts' image tokens expanded, ``multimodal.encode_image_prompts``):
    its tower embeds them on the fly, and an EAGLE-3 head gets SpecVLM's visual compressor
    (``visual_compressor.py``), trained with it. ``on_checkpoint(step, params)`` runs after each
    checkpoint (params with the frozen ones: a drafter's full set), e.g. to measure the drafter
    as it trains."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    opts = options
    vlm, target = _split_vision(target, prompts, images, kind, method)
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
    compressor = None if vlm is None or kind != "eagle3" else visual_compressor_for(vlm, opts.visual_factor)
    if kind == "eagle3":
        dcfg, params, frozen = init_eagle3(target, hidden_layers, init_key, compressor)
        hf_config = eagle3_hf_config(tcfg, hidden_layers, compressor)
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

    def prompt_embeds(position: int, tokens, plen):
        """The rows' prompt embeddings with their images merged (None for a text target)."""
        if vlm is None:
            return None
        rows = (position + np.arange(opts.batch_size)) % len(prompts)
        pixels = preprocess([images[r] for r in rows], vlm.image_processor)
        return place_batch(_image_embeddings(vlm.params, vlm.config, tokens, jnp.asarray(pixels), plen))

    def continue_prompts(position: int, rkey):
        tokens, plen = prompt_batch(prompts, position, opts.batch_size, opts.seq_len)
        tokens, plen = place_batch(tokens), place_batch(plen)
        embeds = prompt_embeds(position, tokens, plen)
        tokens, valid = rollout_jit(tparams, tcfg, tokens, plen, rkey, temperature=temperature, input_embeds=embeds)
        if embeds is not None:  # the continuation is text: its own token embeddings past the prompt
            embeds = _with_continuation(embeds, tparams["embed"], tokens, plen)
        return tokens, valid, plen, embeds

    pool = None
    if method == "sft":  # the fixed dataset: generated once (deterministically, so a resume rebuilds it)
        # Default: one sequence per prompt, but never more than the run consumes (the rest costs target
        # tokens and is never trained on).
        size = opts.sft_sequences or (opts.batch_size * 16 if from_bos else min(len(prompts), steps * opts.batch_size))
        chunks = [continue_prompts(c, jax.random.fold_in(sft_key, c)) for c in range(0, size, opts.batch_size)]
        pool = [None if chunks[0][n] is None else np.concatenate([np.asarray(c[n]) for c in chunks])[:size]
                for n in range(4)]

    def next_batch(state: TrainState):
        if pool is not None:
            rows = (state.data_position + np.arange(opts.batch_size)) % len(pool[0])
            return tuple(None if a is None else place_batch(a[rows]) for a in pool), state.rng
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
        (tokens, valid, plen, embeds), rng = next_batch(state)
        params, opt_state, loss, top1, tpp, verified = train_step(state.params, state.opt_state, frozen, tparams,
                                                                  tokens, valid, plen, embeds, spec=spec)
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
            if on_checkpoint is not None:
                on_checkpoint(state.step, {**jax.device_get(state.params), **jax.device_get(frozen)})
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


def _split_vision(target, prompts, images, kind: str, method: str):
    """(the vision-language model or None, the text model that decodes), after checking the images."""
    from specjax.models.multimodal import VisionLanguageModel

    if not isinstance(target, VisionLanguageModel):
        if images is not None:
            raise ValueError("images need a vision-language target (multimodal.load_vlm); this target is text only")
        return None, target
    if prompts is None or images is None or len(images) != len(prompts):
        raise ValueError("a vision-language target trains on prompts with one image each: pass prompts and "
                         f"images of equal length (got {None if prompts is None else len(prompts)} prompts, "
                         f"{None if images is None else len(images)} images)")
    n = target.config.tokens_per_image
    bad = [i for i, p in enumerate(prompts) if sum(t == target.config.image_token_id for t in p) != n]
    if bad:
        raise ValueError(f"prompt {bad[0]} does not hold one image's {n} image tokens (expand its placeholder: "
                         "multimodal.expand_image_tokens)")
    if kind == "eagle3" and method == "opd":
        raise ValueError("opd replays the head's chains on the text alone; train a vision-language head with "
                         "sft or online")
    if not isinstance(target.image_processor, ImageProcessorConfig):
        raise ValueError("drafter training reads one fixed-size image per prompt (the LLaVA layout's processor); "
                         f"this model's is {type(target.image_processor).__name__}")
    target = dataclasses.replace(target, params=jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), target.params))
    return target, target.text_model()


def visual_compressor_for(vlm, factor: int) -> CompressorConfig:
    """The compressor of a head for ``vlm``: its image tokens as a square grid, shrunk by ``factor``."""
    n = vlm.config.tokens_per_image
    grid = int(round(n ** 0.5))
    if grid * grid != n:
        raise ValueError(f"the visual compressor needs a square grid of image tokens; this model has {n}")
    return CompressorConfig(image_token_id=vlm.config.image_token_id, grid=grid, factor=factor)


_image_embeddings = jax.jit(input_embeddings, static_argnames=("cfg",))


@jax.jit
def _with_continuation(prompt_embeds, embed_table, tokens, prompt_lengths):
    """The prompt's embeddings (images merged) up to each row's prompt length, the tokens' after."""
    in_prompt = jnp.arange(tokens.shape[1])[None, :, None] < prompt_lengths[:, None, None]
    return jnp.where(in_prompt, prompt_embeds, embed_table[tokens].astype(prompt_embeds.dtype))


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
    from specjax.models.multimodal import is_vision_language, load_vlm

    images = None
    if is_vision_language(target_dir):
        if not args.prompts:
            raise ValueError("a vision-language target trains on --prompts: a JSONL file with \"prompt\" and "
                             "\"image\" (an image file, relative to the JSONL file) per line")
        target = load_vlm(target_dir, dtype=jnp.float32)
        texts, images = read_image_prompts_jsonl(args.prompts)
        prompts = encode_image_prompt_ids(target, texts)
    else:
        target = load_model(target_dir, dtype=jnp.float32)
        prompts = encode_prompts(target, read_prompts_jsonl(args.prompts)) if args.prompts else None
    options = TrainOptions(batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, seed=args.seed,
                           ttt_steps=args.ttt_steps, feature_weight=args.feature_weight, opd_weight=args.opd_weight,
                           prompt_weight=args.prompt_weight, rollout_temperature=args.rollout_temperature,
                           save_every=args.save_every, keep=args.keep, draft_layers=args.draft_layers,
                           draft_hidden=args.draft_hidden)
    text_target = target.text_model() if images is not None else target
    init = load_init_params(args.kind, args.init, text_target) if args.init else None
    result = train_drafter(target, args.kind, args.method, args.steps, args.out, prompts=prompts, options=options,
                           resume=args.resume, init_params=init, images=images)
    h = result.history
    print(f"trained {args.kind} ({args.method}) for {h['step'][-1] if h['step'] else 0} steps: final loss "
          f"{np.mean(h['loss'][-20:]):.4f}, top-1 agreement {np.mean(h['top1'][-20:]):.3f}, estimated chain "
          f"tokens/pass {np.mean(h['tokens_per_pass'][-20:]):.2f} (last 20 steps)")
    print(f"wrote {result.weights_path}, {result.config_path}" + (f", {result.plot_path}" if result.plot_path else ""))
    print(f"use it: specjax generate --drafter {'eagle3' if args.kind == 'eagle3' else 'draft-model'} "
          f"--drafter-model {result.out_dir}" + (f" --model {target_dir}" if args.target else ""))
    return 0
