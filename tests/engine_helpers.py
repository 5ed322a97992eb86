"""Small models and drafters shared by the engine tests."""

from __future__ import annotations

import jax
import numpy as np

from specjax.drafters.base import Proposal
from specjax.models.config import ModelConfig
from specjax.models.decoder import init_params
from specjax.models.loading import Model


def tiny_model(seed: int = 0, vocab: int = 64, qk_norm: bool = False, tie: bool = False,
               layers: int = 2, eos=()) -> Model:
    cfg = ModelConfig(model_type="qwen3" if qk_norm else "llama", vocab_size=vocab, hidden_size=32,
                      intermediate_size=64, num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=8,
                      qk_norm=qk_norm, tie_word_embeddings=tie, max_position_embeddings=512,
                      eos_token_ids=tuple(eos))
    # A large init scale makes the next-token distribution peaked, so argmax ties never occur.
    return Model(cfg, init_params(cfg, jax.random.key(seed), scale=0.5))


class OracleTreeDrafter:
    """Proposes random tree shapes whose nodes follow a known continuation with some probability.

    Gives every batch a mix of fully accepted, partially accepted and rejected
    branches. ``shapes`` is a list of parent arrays to cycle through.
    """

    def __init__(self, references: dict, shapes: list, follow_prob: float, vocab: int, seed: int = 0):
        self.references = references  # prompt tuple -> full greedy continuation
        self.shapes = shapes
        self.follow_prob = follow_prob
        self.vocab = vocab
        self.rng = np.random.default_rng(seed)
        self.contexts: dict = {}
        self.calls = 0

    def start_request(self, rid, prompt_ids):
        self.contexts[rid] = (tuple(prompt_ids), [])

    def observe(self, rid, accepted_ids):
        self.contexts[rid][1].extend(accepted_ids)

    def stop_request(self, rid):
        self.contexts.pop(rid)

    def propose(self, rid, max_tokens):
        prompt, out = self.contexts[rid]
        truth = self.references[prompt][len(out):]
        parents = np.asarray(self.shapes[self.calls % len(self.shapes)], np.int32)[:max_tokens]
        self.calls += 1
        tokens = np.zeros(len(parents), np.int32)
        on_truth = np.zeros(len(parents), bool)
        for i, p in enumerate(parents):
            depth_ok = p == -1 or on_truth[p]
            depth = 0 if p == -1 else _depth(parents, p) + 1
            if depth_ok and depth < len(truth) and self.rng.random() < self.follow_prob:
                tokens[i], on_truth[i] = truth[depth], True
            else:
                tokens[i] = self.rng.integers(0, self.vocab)
        return Proposal(tokens, parents, np.ones(len(parents), np.float32))


def _depth(parents, i):
    d = 0
    while parents[i] != -1:
        i, d = parents[i], d + 1
    return d
