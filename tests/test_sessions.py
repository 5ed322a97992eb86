"""Multi-turn sessions: a follow-up turn prefills only its new tokens and changes no output."""

import collections
import gzip
import json
import pathlib

import jax
import pytest

from engine_helpers import tiny_model
from specjax.drafters.suffix_index import SuffixDecodingDrafter
from specjax.engine.engine import Engine
from specjax.engine.plain import greedy_generate
from specjax.models.config import ModelConfig
from specjax.models.decoder import init_params
from specjax.models.loading import Model

TAU = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "tau_airline_gpt4o_public.jsonl.gz"
TURNS = 20
NEW_TOKENS = 4


def _tau_turns(min_turns: int = TURNS) -> list[list[int]]:
    """One tau-bench session as [first prompt, new tokens of turn 2, ...] (the agent's replies cut out)."""
    sessions = collections.defaultdict(list)
    with gzip.open(TAU, "rt") as f:
        for line in f:
            row = json.loads(line)
            sessions[row["session"]].append(row)
    calls = next(c for c in sessions.values() if len(c) >= min_turns)[:min_turns]
    turns = [calls[0]["prompt_ids"]]
    for prev, cur in zip(calls, calls[1:]):
        start = len(prev["prompt_ids"]) + len(prev["response_ids"])
        assert cur["prompt_ids"][: len(prev["prompt_ids"])] == prev["prompt_ids"]
        turns.append(cur["prompt_ids"][start:])
    return turns


def _qwen_vocab_model() -> Model:
    cfg = ModelConfig(model_type="qwen2", vocab_size=151936, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True, max_position_embeddings=16384)
    return Model(cfg, init_params(cfg, jax.random.key(0), scale=0.5))


def _conversation(engine: Engine, turns, session=None):
    """Run the turns, each prompt = everything so far (with the model's own replies) + the new turn."""
    context, replies = [], []
    for turn in turns:
        context = context + turn
        reply = engine.generate([context], max_new_tokens=NEW_TOKENS, session=session)[0].token_ids
        replies.append(reply)
        context = context + reply
    return replies


@pytest.mark.skipif(not TAU.exists(), reason="needs ../shared/data (the public tau-bench traces)")
def test_tau_session_prefills_only_new_turns_and_matches_stateless_runs():
    turns = _tau_turns()
    model = _qwen_vocab_model()
    stateless = _conversation(Engine(model, SuffixDecodingDrafter(), draft_capacity=4), turns)
    engine = Engine(model, SuffixDecodingDrafter(), draft_capacity=4)
    session = engine.session(max_len=8192)
    with_session = _conversation(engine, turns, session)
    assert with_session == stateless
    # Turn 1 prefills its prompt; each later turn its new tokens plus the previous reply's last
    # token (emitted but not yet cached: it is the root the next step would have verified).
    assert session.prefilled_tokens == len(turns[0]) + sum(len(t) + 1 for t in turns[1:])


def test_session_reuses_the_common_prefix_and_falls_back_on_divergence():
    model = tiny_model(4)
    engine = Engine(model, None)
    session = engine.session(max_len=256)
    first = [5, 6, 7, 8, 9, 10]
    reply = engine.generate([first], max_new_tokens=5, session=session)[0].token_ids
    assert session.prefilled_tokens == len(first)
    diverged = first[:3] + [30, 31]  # shares 3 tokens with the cache
    again = engine.generate([diverged], max_new_tokens=5, session=session)[0].token_ids
    assert session.prefilled_tokens == len(first) + 2
    assert again == greedy_generate(model, [diverged], 5)[0]
    assert reply == greedy_generate(model, [first], 5)[0]
    same = engine.generate([diverged], max_new_tokens=5, session=session)[0].token_ids  # fully cached prompt
    assert same == again and session.prefilled_tokens == len(first) + 3  # the last prompt token reruns


def test_session_overflow_and_batches_are_clear_errors():
    engine = Engine(tiny_model(4), None)
    session = engine.session(max_len=128)
    with pytest.raises(ValueError, match="session cache overflow"):
        engine.generate([[1] * 100], max_new_tokens=40, session=session)
    with pytest.raises(ValueError, match="one prompt"):
        engine.generate([[1], [2]], max_new_tokens=4, session=session)
    with pytest.raises(ValueError, match="max_len"):
        engine.session(max_len=10**6)
