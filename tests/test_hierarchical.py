"""HierSpec (``drafters/hierarchical.py``): the target's output equals plain decoding (greedy and
sampled) for every intermediate / top combination, at batch 1 and 2; the chains handed to the target
(recorded from the target's own step) hold at least ``min_draft_length`` tokens unless they end at
the end-of-sequence token, and are the intermediate's own greedy continuation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine_helpers import near_copy, tiny_model
from specjax.drafters.draft_model import DraftModelDrafter, VocabMismatchError
from specjax.drafters.hierarchical import HierarchicalDrafter
from specjax.drafters.token_recycling import TokenRecyclingDrafter
from specjax.engine import device_loop
from specjax.engine.device_loop import generate_on_device
from specjax.engine.engine import Engine
from specjax.engine.plain import generate_plain, greedy_generate
from specjax.engine.sampling import SamplingParams
from specjax.engine.steps import Accepted

V = 64
EOS = 21  # the target's greedy continuations reach it after 8 to 12 tokens in three of the prompts
PROMPTS = [[5, 17, 33, 8], [9, 42, 61, 7, 7, 3, 30, 11, 12, 40, 41], [3], [50, 51, 52, 53, 54, 55, 56]]
NEW_TOKENS = 20
MIN_LENGTH = 4
TARGET = tiny_model(0, vocab=V, eos=(EOS,))
INTERMEDIATES = {
    "perturbed_target": near_copy(TARGET, 0.02, seed=1),  # close: long accepted prefixes
    "other_model": tiny_model(5, vocab=V, eos=(EOS,)),  # unrelated: the target rejects most of each chain
}
TOP_MODEL = tiny_model(7, vocab=V, eos=(EOS,))  # the intermediates' config: a draft model of either shares programs
TOPS = {
    "token_recycling": lambda: TokenRecyclingDrafter(V, capacity=8),
    "draft_chain": lambda: DraftModelDrafter(TOP_MODEL, V, capacity=4),
    "draft_tree": lambda: DraftModelDrafter(TOP_MODEL, V, capacity=6, topk=2, depth=3),
}

# ------------------------------------------------------------------ the drafts the target verifies

RECORDS: list = []
REAL_STEP = device_loop.step_impl


def _recording_step(params, state, tree, **kwargs):
    """The device loop's step, recording each tree it verifies with the target's context."""
    jax.debug.callback(lambda *a: RECORDS.append(tuple(np.asarray(x) for x in a)),
                       state.lengths, state.finished, tree.tokens, tree.valid)
    return REAL_STEP(params, state, tree, **kwargs)


@pytest.fixture(autouse=True, scope="module")
def record_target_steps():
    """Every hierarchical program of this module is traced with the recording step (they are
    compiled here only: no other module builds a ``HierarchicalDrafter``)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(device_loop, "step_impl", _recording_step)
    yield
    mp.undo()


def run(drafter, batch: int, **kwargs):
    RECORDS.clear()
    results = generate_on_device(Engine(TARGET, attention="xla", max_batch_size=batch), PROMPTS, NEW_TOKENS,
                                 drafter=drafter, steps_per_sync=4, **kwargs)
    assert RECORDS, "the recording step did not run"
    return results


def chains():
    """(row, the target's cache length, chain tokens) of every active row's verified chain, in step order."""
    out = []
    for lengths, finished, tokens, valid in RECORDS:
        for row in np.flatnonzero(~finished):
            assert valid[row].tolist() == sorted(valid[row].tolist(), reverse=True), "a chain, not a tree"
            out.append((row, int(lengths[row]), tokens[row, : valid[row].sum()].tolist()))
    return out


def assert_long_enough(found):
    short = [c for _, _, c in found if len(c) < MIN_LENGTH]
    assert all(c and c[-1] == EOS for c in short), f"chains shorter than {MIN_LENGTH} not ending at EOS: {short}"
    return short


# ------------------------------------------------------------------ greedy


@pytest.mark.parametrize("top, batch", [("token_recycling", 1), ("token_recycling", 2), ("draft_chain", 2),
                                        ("draft_tree", 1)])
def test_greedy_equals_plain_greedy_and_chains_are_long(top, batch):
    expected = greedy_generate(TARGET, PROMPTS, NEW_TOKENS)
    short_at_eos = 0
    for name, intermediate in INTERMEDIATES.items():
        drafter = HierarchicalDrafter(intermediate, TOPS[top](), V, min_draft_length=MIN_LENGTH)
        results = run(drafter, batch)
        assert [r.token_ids for r in results] == expected, name
        found = chains()
        assert found and max(len(c) for _, _, c in found) <= drafter.capacity
        short_at_eos += len(assert_long_enough(found))
        if name == "perturbed_target":  # the chains matter: more than one token per target pass
            assert sum(len(r.token_ids) for r in results) / sum(r.target_passes for r in results) > 1.5
    assert short_at_eos > 0, "no chain stopped at the intermediate's EOS: the EOS rule went untested"


def test_chains_are_the_intermediates_greedy_continuation():
    """Each chain the target verifies is what the intermediate alone decodes from the target's context
    (the top drafter changes only how fast the intermediate gets there)."""
    intermediate = INTERMEDIATES["perturbed_target"]
    drafter = HierarchicalDrafter(intermediate, TOPS["token_recycling"](), V, min_draft_length=MIN_LENGTH)
    prompt = PROMPTS[1]
    RECORDS.clear()
    out = generate_on_device(Engine(TARGET, attention="xla", max_batch_size=1), [prompt], NEW_TOKENS,
                             drafter=drafter, steps_per_sync=4)[0].token_ids
    found = chains()
    assert len(found) >= 3
    for _, length, chain in found:
        context = prompt + out[: length - len(prompt) + 1]  # the prompt, the cached outputs and the root
        assert greedy_generate(intermediate, [context], len(chain))[0] == chain


def test_intermediate_equal_to_target_has_whole_chains_accepted():
    drafter = HierarchicalDrafter(TARGET, TOPS["token_recycling"](), V, min_draft_length=MIN_LENGTH)
    results = run(drafter, 2)
    assert [r.token_ids for r in results] == greedy_generate(TARGET, PROMPTS, NEW_TOKENS)
    row = results[1]  # the one prompt that never reaches EOS: every pass but the last emits a whole chain
    assert row.accepted_draft_tokens >= MIN_LENGTH * (row.target_passes - 2)


def test_top_drafter_follows_the_intermediate():
    """The intermediate as its own top's draft model: when the top is rewound to the target's context
    after every step, each of its chains is accepted whole, so one intermediate pass per proposal."""
    intermediate = INTERMEDIATES["perturbed_target"]
    drafter = HierarchicalDrafter(intermediate, DraftModelDrafter(intermediate, V, capacity=4), V,
                                  min_draft_length=MIN_LENGTH)
    results = run(drafter, 2)
    assert [r.token_ids for r in results] == greedy_generate(TARGET, PROMPTS, NEW_TOKENS)
    # One pass per proposal while the row runs, and at most one more: the proposal after its last step.
    for passes, result in zip(drafter.last_inter_passes.tolist(), results[2:]):  # the last batch
        assert result.target_passes - 1 <= passes <= result.target_passes


def test_plain_steps_keep_the_intermediate_in_step():
    """Target steps with no chain (the auto size's plain steps: ``update`` with no ``propose`` before
    it) leave the intermediate and its top at the target's context: the next chain is still the
    intermediate's greedy continuation."""
    intermediate = INTERMEDIATES["perturbed_target"]
    drafter = HierarchicalDrafter(intermediate, TOPS["draft_chain"](), V, min_draft_length=MIN_LENGTH)
    prompt, plain_steps = PROMPTS[1], 3
    out = greedy_generate(TARGET, [prompt], plain_steps + 1)[0]
    dstate = jax.jit(drafter.prefill)(drafter.params, drafter.init_state(1, 64), jnp.asarray([prompt]),
                                      jnp.asarray([len(prompt)]), jnp.asarray(out[:1]))
    update = jax.jit(drafter.update)
    zeros = jnp.zeros((1, 1), jnp.int32)
    for token in out[1:]:
        plain = Accepted(tokens=jnp.asarray([[token]]), num=jnp.ones(1, jnp.int32), num_draft_accepted=zeros[:, 0],
                         path=zeros)
        dstate = update(drafter.params, dstate, plain, None)
    propose = jax.jit(functools.partial(drafter.propose, with_q=False))
    tree, _ = propose(drafter.params, dstate, jnp.asarray(out[-1:]), jnp.asarray([len(prompt) + plain_steps]),
                      SamplingParams.make(1), jax.random.split(jax.random.key(0), 1))
    chain = np.asarray(tree.tokens[0])[np.asarray(tree.valid[0])].tolist()
    assert len(chain) >= MIN_LENGTH
    assert greedy_generate(intermediate, [prompt + out], len(chain))[0] == chain


# ------------------------------------------------------------------ sampled


def test_sampled_output_is_plain_sampling():
    """Sampled rows (and a greedy one) give exactly plain sampling's tokens for the same seeds."""
    temperature, top_k, top_p = [0.9, 0.7, 0.0, 1.0], [0, 5, 0, 0], [1.0, 1.0, 1.0, 0.8]
    expected = generate_plain(TARGET, PROMPTS, NEW_TOKENS, temperature=temperature, top_k=top_k, top_p=top_p,
                              seed=3)
    per_pass = {}
    for name, intermediate in {**INTERMEDIATES, "target_itself": TARGET}.items():
        drafter = HierarchicalDrafter(intermediate, TOPS["draft_chain"](), V, min_draft_length=MIN_LENGTH)
        results = run(drafter, 2, temperature=temperature, top_k=top_k, top_p=top_p, seed=3)
        assert [r.token_ids for r in results] == expected, name
        found = chains()
        assert_long_enough(found)
        accepted = sum(r.accepted_draft_tokens for r in results)
        per_pass[name] = accepted / sum(r.target_passes for r in results)
        if name != "target_itself":  # control: emitting the chains unverified would not be plain sampling
            assert accepted < sum(len(c) for _, _, c in found)
    # The intermediate draws each position with the target's noise: the target itself as the
    # intermediate has every chain accepted; the further the intermediate, the fewer.
    assert per_pass["target_itself"] > per_pass["perturbed_target"] > per_pass["other_model"], per_pass


# ------------------------------------------------------------------ construction and the factory


def test_bad_combinations_are_refused():
    with pytest.raises(VocabMismatchError, match="intermediate model vocab_size 32 != target vocab_size 64"):
        HierarchicalDrafter(tiny_model(1, vocab=32), TokenRecyclingDrafter(32), V)
    with pytest.raises(VocabMismatchError, match="top drafter vocab_size 32"):
        HierarchicalDrafter(TARGET, TokenRecyclingDrafter(32), V)
    with pytest.raises(ValueError, match="top drafter must be one of"):
        HierarchicalDrafter(TARGET, object(), V)
    with pytest.raises(ValueError, match="capacity 3 < min_draft_length 6"):
        HierarchicalDrafter(TARGET, TokenRecyclingDrafter(V), V, capacity=3)


def test_load_drafter_builds_it_on_the_embedded_model():
    from specjax.drafters.factory import load_drafter
    from specjax.models.embedded import default_model_dir, embedded_drafter_dir
    from specjax.models.loading import load_model

    if embedded_drafter_dir() is None:
        pytest.skip("the embedded draft model is not installed")
    target = load_model(default_model_dir())
    drafter = load_drafter("hierarchical", target, draft_capacity=8)
    assert isinstance(drafter, HierarchicalDrafter) and isinstance(drafter.top, TokenRecyclingDrafter)
    assert drafter.capacity == 8 and drafter.intermediate.path == embedded_drafter_dir()
    with pytest.raises(ValueError, match="INTERMEDIATE\\[,HEAD\\], got 3"):
        load_drafter("hierarchical", target, drafter_model="a,b,c")
