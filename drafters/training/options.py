"""What a drafter training run is configured by: the drafter kinds, the methods and the hyperparameters."""

from __future__ import annotations

import dataclasses
from typing import Optional

KINDS = ("eagle3", "draft-model")
METHODS = ("sft", "online", "opd")


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """Hyperparameters (defaults in parentheses are EAGLE-3's / specjax's choices)."""

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
    visual_factor: int = 2  # a vision-language target: the compressor shrinks each side of the image grid by this

    def __post_init__(self):
        if self.seq_len < 8 or self.batch_size < 1 or self.ttt_steps < 1:
            raise ValueError("seq_len must be >= 8, batch_size and ttt_steps >= 1")
