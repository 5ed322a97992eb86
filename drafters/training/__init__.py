"""Drafter training: EAGLE-3 heads and draft models distilled online from a frozen target.

The target runs frozen inside the jitted train step: from a token batch it
computes its logits (the teacher distribution) and, for EAGLE-3, the hidden
states of the head's feature layers (SpecVLM's online distillation: nothing but
token ids is stored). The drafter is trained by soft cross-entropy to the
target's next-token distribution: an EAGLE-3 head unrolled as it drafts (the
training-time test, ``rollouts.py``), a draft model (a small Llama with the
target's vocabulary) at every position (``losses.py``).

Methods (where the token batches come from):

- ``sft``: target continuations of the prompts generated once, then trained on
  as a fixed dataset (cycled).
- ``online``: fresh target continuations of the next prompts at every step.
  With greedy rollouts (``rollout_temperature=0``) of a prompt list that a run
  goes through at most once, this is the same data as ``sft``; they differ with
  sampled rollouts (fresh samples every step, e.g. prompts sampled from BOS) or
  when ``sft_sequences`` makes the fixed pool smaller than the prompt stream.
- ``opd`` (Draft-OPD, on-policy distillation): the online batch plus the
  drafter's own drafting replayed on it, trained on the target's feedback at
  the states a speculative loop visits (``losses.py``).

With several devices that divide the batch, the batch is sharded over a mesh's
``data`` axis (params replicated): data parallel, the same math.

Outputs in ``out_dir``: ``config.json`` + ``model.safetensors`` that
``load_eagle3`` (EAGLE-3) or ``load_model`` (draft model: a Hugging Face Llama
directory) read, ``history.json``, ``curves.png``, and orbax checkpoints in
``checkpoints/`` (``resume=True`` continues exactly).

The modules: ``options.py`` (kinds, methods, hyperparameters), ``rollouts.py``
(the target's rollouts and the unrolled forwards: EAGLE-3's training-time test,
the target verifying drafted chains, the draft model's causal forward),
``losses.py`` (the distillation losses, Draft-OPD's weights, the jitted train
step), ``export.py`` (building the drafter to train and writing it out) and
``loop.py`` (prompts, the training loop, ``specjax train-drafter``).
"""

from specjax.drafters.training.export import load_init_params
from specjax.drafters.training.loop import TrainResult, encode_prompts, read_prompts_jsonl, train_drafter
from specjax.drafters.training.options import KINDS, METHODS, TrainOptions

__all__ = ["KINDS", "METHODS", "TrainOptions", "TrainResult", "encode_prompts", "load_init_params",
           "read_prompts_jsonl", "train_drafter"]
