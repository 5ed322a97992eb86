"""The on-device loop with device drafters: lossless greedy on transformers-built models,
device loop == host loop, lossless sampling with a draft model's (coupled) draws, Token Recycling's
acceptance on the embedded model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine_helpers import chi_square_p, exact_pair_distribution, near_copy, tiny_model
from specjax.drafters import device
from specjax.drafters.draft_model import DraftModelDrafter
from specjax.drafters.eagle3 import Eagle3Config, Eagle3Drafter, init_params
from specjax.drafters.token_recycling import TokenRecyclingDrafter
from specjax.engine.device_loop import generate_on_device
from specjax.engine.engine import Engine
from specjax.engine.plain import greedy_generate
from specjax.models.config import ModelConfig
from specjax.models.loading import Model, load_model

PROMPTS = [[5, 17, 33, 8], [9, 42, 61, 7, 7, 3, 30, 11, 12, 40, 41], [3], [50, 51, 52, 53, 54, 55, 56]]
NEW_TOKENS = 20


def random_eagle3(target: Model, seed: int = 0, draft_vocab: int = 50) -> Eagle3Drafter:
    """An untrained EAGLE-3 head for this target (features: embeddings and both layers' outputs)."""
    t = target.config
    layer = ModelConfig(model_type="llama", vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                        intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                        head_dim=t.hidden_size // 4, rms_norm_eps=1e-5)
    cfg = Eagle3Config(layer, draft_vocab, t.hidden_size)
    return Eagle3Drafter(cfg, init_params(cfg, jax.random.key(seed)), t.num_layers, capacity=10, topk=3, depth=4,
                         hidden_layers=(0, 1, 2))


DRAFTERS = {
    "draft_chain_self": lambda m: DraftModelDrafter(m, m.config.vocab_size, capacity=4),
    "draft_tree_random": lambda m: DraftModelDrafter(tiny_model(7, vocab=m.config.vocab_size), m.config.vocab_size,
                                                     capacity=10, topk=3, depth=4),
    "eagle3_chain": lambda m: dataclasses.replace(random_eagle3(m), capacity=4, topk=1, depth=4),
    "eagle3_tree": random_eagle3,
    "token_recycling": lambda m: TokenRecyclingDrafter(m.config.vocab_size, capacity=24),
}


@pytest.fixture(scope="module")
def target(request, tmp_path_factory):
    pytest.importorskip("torch")
    from hf_models import save_hf_model

    directory = str(tmp_path_factory.mktemp(request.param))
    save_hf_model(request.param, directory, seed=11)
    model = load_model(directory, dtype=jnp.float32)
    return model, greedy_generate(model, PROMPTS, NEW_TOKENS)


# Every drafter on llama; on qwen2 and qwen3 a draft model and an EAGLE-3 head each, chain
# on one and tree on the other (each case compiles a whole fused step: the matrix is trimmed for time).
CASES = [("llama", name) for name in sorted(DRAFTERS)] + [
    ("qwen2", "draft_tree_random"), ("qwen2", "eagle3_chain"), ("qwen2", "token_recycling"),
    ("qwen3", "draft_chain_self"), ("qwen3", "eagle3_tree")]


@pytest.mark.parametrize("target, name", CASES, indirect=["target"])
def test_greedy_equals_plain_greedy(target, name):
    model, expected = target
    drafter = DRAFTERS[name](model)
    results = generate_on_device(Engine(model, attention="xla"), PROMPTS, NEW_TOKENS, drafter=drafter,
                                 steps_per_sync=4)
    assert [r.token_ids for r in results] == expected
    if name == "draft_chain_self":  # the target drafting for itself is always right
        assert min(r.tokens_per_pass for r in results if len(r.token_ids) == NEW_TOKENS) > 3


def test_device_loop_equals_host_loop_with_sampled_rows():
    """Same seed, one host sync per step or per 8 steps: the same tokens (greedy and sampled rows)."""
    model = tiny_model(2, vocab=64)
    engine = Engine(model, attention="xla")
    drafter = DraftModelDrafter(tiny_model(4, vocab=64), 64, capacity=8, topk=2, depth=3)
    runs = []
    for steps in (1, 8):
        runs.append([r.token_ids for r in generate_on_device(engine, PROMPTS, 16, temperature=[0.0, 0.8, 1.0, 0.5],
                                                             seed=3, drafter=drafter, steps_per_sync=steps)])
    assert runs[0] == runs[1]
    assert runs[0][0] == greedy_generate(model, PROMPTS[:1], 16)[0]


# ------------------------------------------------------------------ lossless sampling with q

V = 6
TARGET = tiny_model(3, vocab=V)
PROMPT = [1, 2, 3]
N = 3000


REAL_CHILDREN = device._children


def topk_children_with_q(keys, positions, logits, temperature, k, with_q, target_ids, target_vocab):
    """Sampled rows get the top-k children (not draws from q) but still pass q."""
    ids, logp, _ = REAL_CHILDREN(keys, positions, logits, jnp.zeros_like(temperature), k, with_q, target_ids,
                                 target_vocab)
    temp = jnp.where(temperature > 0, temperature, 1.0)[:, None, None]
    return ids, logp, jax.nn.softmax(logits / temp, axis=-1)


def untempered_q(keys, positions, logits, temperature, k, with_q, target_ids, target_vocab):
    """Children drawn at the row's temperature, but q reported at temperature 1."""
    ids, logp, _ = REAL_CHILDREN(keys, positions, logits, temperature, k, with_q, target_ids, target_vocab)
    return ids, logp, jax.nn.softmax(logits, axis=-1)


def uncoupled(keys, positions, logits, temperature, k, with_q, target_ids, target_vocab):
    """Children drawn from q with noise of their own, none sharing the target's."""
    other = jax.vmap(lambda key: jax.random.fold_in(key, 99))(keys)
    return REAL_CHILDREN(other, positions, logits, temperature, k, with_q, target_ids, target_vocab)


_DRAFTERS: dict = {}


def sampled_pairs(temperature: float, seed: int, children=None) -> tuple[np.ndarray, int]:
    """(t2, t3) of N rows sampled with a draft-model tree (one compiled program per children rule),
    and the draft tokens accepted."""
    if children not in _DRAFTERS:
        # Drafters are keyed by type and settings, and the rule is patched into the module, not a
        # setting: one drafter class per rule gives each rule its own compiled program.
        rule = type(f"DraftModel_{getattr(children, '__name__', 'real')}", (DraftModelDrafter,), {})
        _DRAFTERS[children] = rule(near_copy(TARGET, 0.25, seed=9), V, capacity=6, topk=2, depth=2)
    engine = Engine(TARGET, attention="xla", max_batch_size=N)
    device._children = children or REAL_CHILDREN
    try:
        results = generate_on_device(engine, [PROMPT] * N, 3, temperature=temperature, seed=seed,
                                     drafter=_DRAFTERS[children])
    finally:
        device._children = REAL_CHILDREN
    return np.array([r.token_ids[1:3] for r in results]), sum(r.accepted_draft_tokens for r in results)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_draft_model_q_keeps_the_distribution(temperature):
    pairs, accepted = sampled_pairs(temperature, seed=1)
    assert accepted > N // 4  # the drafts matter
    assert chi_square_p(pairs, exact_pair_distribution(TARGET, PROMPT, temperature)) > 1e-4


@pytest.mark.parametrize("children", [topk_children_with_q, untempered_q, uncoupled],
                         ids=["topk_with_q", "untempered_q", "uncoupled"])
def test_drafts_that_ignore_their_q_cannot_bias_the_output(children):
    """Acceptance compares each node with the target's own draw, never with q: any drafts keep
    the distribution (only how many are accepted depends on them: tests/test_seeds.py)."""
    pairs, _ = sampled_pairs(0.7, seed=2, children=children)
    assert chi_square_p(pairs, exact_pair_distribution(TARGET, PROMPT, 0.7)) > 1e-4


# ------------------------------------------------------------------ Token Recycling on the embedded model


def test_token_recycling_learns_on_demo_prompts():
    from specjax.models.embedded import default_model_dir
    from specjax.models.embedded.toy_corpus import sql_prompts

    model = load_model(default_model_dir(), dtype=jnp.float32)
    engine = Engine(model, attention="xla", max_batch_size=8)
    drafter = TokenRecyclingDrafter(model.config.vocab_size, capacity=80)
    prompts = sql_prompts(32, seed=0)
    results = generate_on_device(engine, prompts, 64, drafter=drafter)
    tokens = sum(len(r.token_ids) for r in results)
    assert tokens / sum(r.target_passes for r in results) > 1.5
    encoded = [engine.encode(p) for p in prompts]
    assert [r.token_ids for r in results] == greedy_generate(model, encoded, 64)


def test_stop_strings_cut_like_the_host_engine():
    """Stops are checked every N steps on the device loop, yet ids and text match the host engine's."""
    from specjax.models.embedded import default_model_dir
    from specjax.models.embedded.toy_corpus import sql_prompts

    model = load_model(default_model_dir(), dtype=jnp.float32)
    prompts = sql_prompts(4, seed=2)
    stop = [" WHERE", " FROM"]
    plain = Engine(model, None, draft_capacity=0, attention="xla").generate(prompts, 48, stop=stop)
    device = generate_on_device(Engine(model, attention="xla"), prompts, 48, stop=stop, steps_per_sync=16,
                                drafter=DraftModelDrafter(model, model.config.vocab_size, capacity=6))
    assert [r.token_ids for r in device] == [r.token_ids for r in plain]
    assert [r.text for r in device] == [r.text for r in plain]
    assert all(" FROM" not in r.text for r in device)
    assert all(any(s in model.tokenizer.decode(r.token_ids) for s in stop) for r in device)  # every row stopped


def test_device_loop_on_a_mesh():
    """Target tensor-parallel over a 2 x 2 CPU mesh (batch over data), the drafter replicated."""
    from specjax.models.sharding import make_mesh

    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices (conftest asks XLA for 8 CPU devices)")
    model = tiny_model(0, vocab=64)
    mesh = make_mesh(data=2, model=2, devices=jax.devices()[:4])
    drafter = DraftModelDrafter(tiny_model(1, vocab=64), 64, capacity=8, topk=2, depth=3)
    results = Engine(model, drafter, mesh=mesh).generate(PROMPTS, 16)
    assert [r.token_ids for r in results] == greedy_generate(model, PROMPTS, 16)


def test_an_engine_without_a_drafter_decodes_in_fused_chunks(monkeypatch):
    """Plain decoding at its fastest (the baseline every speedup is measured against): the steps
    run fused in the on-device loop, with plain decoding's tokens greedy and sampled; a session or
    per-step streaming still steps in the host loop."""
    from specjax.engine import device_loop
    from specjax.engine.plain import generate_plain

    target = tiny_model(2)
    prompts = [[5, 17, 33, 8], [9, 42, 61, 7, 7, 3, 30, 11], [3]]
    loops = []
    real = device_loop.generate_on_device
    monkeypatch.setattr(device_loop, "generate_on_device", lambda *a, **k: loops.append(k["drafter"]) or real(*a, **k))
    engine = Engine(target, None, attention="xla")
    assert [r.token_ids for r in engine.generate(prompts, 20)] == greedy_generate(target, prompts, 20)
    sampled = engine.generate(prompts, 20, temperature=1.2, top_p=0.95, seed=3)
    assert [r.token_ids for r in sampled] == generate_plain(target, prompts, 20, temperature=1.2, top_p=0.95, seed=3)
    assert len(loops) == 2 and all(isinstance(d, device_loop.NoDrafter) for d in loops)
    streamed = []
    engine.generate(prompts, 20, on_tokens=lambda i, ids: streamed.append((i, list(ids))))
    assert len(loops) == 2  # the host loop: one call per step and request, not one per request
    assert len(streamed) > len(prompts)
