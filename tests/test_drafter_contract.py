"""The host drafter contract: the ``HostDrafter`` base class, strict proposal checks, one drafter per Engine.

A malformed proposal is refused with an error naming the drafter class and the
field (it used to be broadcast, cut, cast or dropped into some other tree); a
well-formed drafter written against the base class stays lossless; the batched
fast check agrees with the per-proposal one; the shipped host drafters keep the
contract (path probabilities never rise from parent to child); and a drafter
that learns across requests is refused by a second Engine unless sharing is explicit.
"""

import gc

import numpy as np
import pytest

from engine_helpers import tiny_model
from specjax.drafters.base import (DrafterAlreadyAttached, HostDrafter, InvalidProposal, Proposal,
                                   check_proposals)
from specjax.drafters.draft_model import DraftModelDrafter
from specjax.drafters.graft import GraftDrafter
from specjax.drafters.prompt_lookup import PromptLookupDrafter
from specjax.drafters.suffix_index import SuffixDecodingDrafter
from specjax.engine.engine import Engine
from specjax.engine.plain import greedy_generate

VOCAB = 64
MODEL = tiny_model(3, vocab=VOCAB)
CAPACITY = 4
PROMPTS = [[3, 9, 4, 3, 9, 4, 3, 9], [17, 2, 5, 17, 2, 5, 17]]


def _chain(n: int) -> Proposal:
    """A well-formed chain of n nodes with falling path probabilities."""
    return Proposal(np.arange(1, n + 1, dtype=np.int32), np.arange(-1, n - 1, dtype=np.int32),
                    0.9 ** np.arange(1, n + 1, dtype=np.float32))


def _replace(**fields) -> Proposal:
    proposal = _chain(4)
    for name, value in fields.items():
        setattr(proposal, name, value)
    return proposal


class FixedDrafter(HostDrafter):
    """Proposes the same thing every step; only ``propose`` is written (the base class's no-ops do the rest)."""

    def __init__(self, proposal):
        self.proposal = proposal

    def propose(self, request_id, max_tokens):
        return self.proposal


MALFORMED = {  # name: (what propose returns, the words the error must contain)
    "short parents": (_replace(parents=np.array([-1], np.int32)), "parents of length 1 for 4 tokens"),
    "long parents": (_replace(parents=np.arange(-1, 5, dtype=np.int32)), "parents of length 6 for 4 tokens"),
    "short probs": (_replace(probs=np.ones(3, np.float32)), "probs of length 3 for 4 tokens"),
    "float tokens": (_replace(tokens=np.array([1.0, 2.0, 3.0, 4.0])), "tokens of dtype float64, not integer"),
    "list tokens": (_replace(tokens=[1, 2, 3, 4]), "tokens as a list, not a numpy array"),
    "2-D tokens": (_replace(tokens=np.ones((4, 1), np.int32)), r"tokens of shape \(4, 1\), not 1-D"),
    "integer probs": (_replace(probs=np.ones(4, np.int32)), "probs of dtype int32, not float"),
    "id >= vocab": (_replace(tokens=np.array([1, 2, VOCAB, 4], np.int32)), rf"tokens\[2\] = {VOCAB}, outside"),
    "negative id": (_replace(tokens=np.array([1, -2, 3, 4], np.int32)), r"tokens\[1\] = -2, outside"),
    "parents[i] >= i": (_replace(parents=np.array([-1, 0, 2, 1], np.int32)), r"parents\[2\] = 2: need"),
    "parents < -1": (_replace(parents=np.array([-1, -2, 1, 2], np.int32)), r"parents\[1\] = -2: need"),
    "probs > 1": (_replace(probs=np.array([1.5, 0.5, 0.4, 0.3], np.float32)), r"probs\[0\] = 1.5, not a prob"),
    "NaN probs": (_replace(probs=np.array([0.9, np.nan, 0.4, 0.3], np.float32)), r"probs\[1\] = nan, not a prob"),
    "increasing probs along a path": (_replace(probs=np.array([0.9, 0.5, 0.6, 0.3], np.float32)),
                                      r"probs\[2\] = 0.6.* above its parent's probs\[1\] = 0.5"),
    "too many nodes": (_chain(CAPACITY + 1), f"5 nodes, more than the max_tokens={CAPACITY}"),
    "None": (None, "None, not a Proposal"),
    "tuple": ((np.arange(4, dtype=np.int32), np.arange(-1, 3, dtype=np.int32)), "a tuple, not a Proposal"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_engine_refuses_a_malformed_proposal_naming_the_drafter_and_field(name):
    proposal, words = MALFORMED[name]
    engine = Engine(MODEL, FixedDrafter(proposal), draft_capacity=CAPACITY, attention="xla")
    with pytest.raises(InvalidProposal, match=f"^FixedDrafter.propose returned .*{words}"):
        engine.generate(PROMPTS, max_new_tokens=4)


def test_graft_refuses_a_malformed_retrieval_proposal():
    draft = DraftModelDrafter(MODEL, VOCAB, capacity=4, topk=2, depth=2)
    graft = GraftDrafter(draft, FixedDrafter(_replace(parents=np.array([-1], np.int32))), capacity=4)
    with pytest.raises(InvalidProposal, match="FixedDrafter.propose returned parents of length 1 for 4 tokens"):
        graft._retrieve(["r"], np.array([True]), [[]], VOCAB)


class ForkingOracleDrafter(HostDrafter):
    """A custom drafter on the base class that knows each prompt's greedy continuation: a true chain
    and, under each true node, a wrong sibling, so every step mixes accepted and rejected branches."""

    def __init__(self, continuations: dict):
        self.continuations, self.contexts = continuations, {}

    def start_request(self, request_id, prompt_ids):
        self.contexts[request_id] = (tuple(prompt_ids), [])

    def observe(self, request_id, accepted_ids):
        self.contexts[request_id][1].extend(accepted_ids)

    def stop_request(self, request_id):
        del self.contexts[request_id]

    def propose(self, request_id, max_tokens):
        prompt, out = self.contexts[request_id]
        truth = self.continuations[prompt][len(out):]
        tokens, parents, probs = [], [], []
        parent, prob = -1, 1.0
        for token in truth[: max_tokens // 2]:
            tokens += [(token + 1) % VOCAB, token]  # the wrong sibling first: it must not be accepted
            parents += [parent, parent]
            probs += [0.1 * prob, 0.8 * prob]
            parent, prob = len(tokens) - 1, 0.8 * prob
        return Proposal(np.asarray(tokens, np.int32), np.asarray(parents, np.int32), np.asarray(probs, np.float32))


def test_a_custom_drafter_on_the_base_class_is_lossless_and_drafts():
    expected = greedy_generate(MODEL, PROMPTS, 24)
    drafter = ForkingOracleDrafter({tuple(p): e for p, e in zip(PROMPTS, expected)})
    results = Engine(MODEL, drafter, draft_capacity=CAPACITY, attention="xla").generate(PROMPTS, 24)
    assert [r.token_ids for r in results] == expected
    assert min(r.tokens_per_pass for r in results) > 2  # the true chains were accepted past the wrong siblings


def test_the_base_class_needs_propose_and_the_engine_needs_a_drafter():
    class NoPropose(HostDrafter):
        pass

    with pytest.raises(TypeError, match="abstract"):
        NoPropose()
    with pytest.raises(TypeError, match="list lacks start_request, propose, observe, stop_request"):
        Engine(MODEL, [], draft_capacity=CAPACITY)


def _random_proposal(rng: np.random.Generator) -> Proposal:
    """A random tree, valid about half the time: one value rule may be broken at a random node."""
    n = int(rng.integers(0, 7))
    parents = np.array([rng.integers(-1, i) for i in range(n)], np.int32)
    probs = np.ones(n, np.float32)
    for i in range(n):
        probs[i] = (1.0 if parents[i] < 0 else probs[parents[i]]) * rng.uniform(0.3, 1.0)
    proposal = Proposal(rng.integers(0, VOCAB, n).astype(np.int32), parents, probs)
    if n and rng.random() < 0.5:
        i = int(rng.integers(n))
        broken = rng.integers(4)
        if broken == 0:
            proposal.tokens[i] = VOCAB
        elif broken == 1:
            proposal.parents[i] = i
        elif broken == 2:
            proposal.probs[i] = 1.01
        else:
            proposal.probs[i] = min(1.0, probs[parents[i]] * 1.01) if parents[i] >= 0 else -0.1
    return proposal


def _alone_ok(proposal: Proposal) -> bool:
    try:
        check_proposals([proposal], FixedDrafter(None), 8, VOCAB)
        return True
    except InvalidProposal:
        return False


def test_the_batched_check_agrees_with_each_proposal_checked_alone():
    """The fast path checks a whole step at once: it must refuse a step iff one of its proposals is bad,
    and name that proposal's first bad node (offsets between proposals shift no index)."""
    rng = np.random.default_rng(0)
    refused = 0
    for _ in range(300):
        step = [_random_proposal(rng) for _ in range(int(rng.integers(1, 5)))]
        alone = [_alone_ok(p) for p in step]
        try:
            check_proposals(step, FixedDrafter(None), 8, VOCAB)
            assert all(alone)
        except InvalidProposal as err:
            refused += 1
            first_bad = step[alone.index(False)]
            with pytest.raises(InvalidProposal) as single:
                check_proposals([first_bad], FixedDrafter(None), 8, VOCAB)
            assert str(err) == str(single.value)
    assert 50 < refused < 250  # both branches ran


SHIPPED = {
    "prompt lookup": lambda: PromptLookupDrafter(max_ngram=3, max_branches=3),
    "suffix chain": lambda: SuffixDecodingDrafter(min_token_prob=0.0),
    "suffix tree": lambda: SuffixDecodingDrafter(tree=True, min_token_prob=0.0),
    "suffix budget": lambda: SuffixDecodingDrafter(tree=True, budget_mode=True, min_token_prob=0.0),
}


@pytest.mark.parametrize("core", ["auto", "python"])
@pytest.mark.parametrize("name", list(SHIPPED))
def test_shipped_host_drafters_keep_the_contract(name, core, monkeypatch):
    """Repetitive traffic with branching continuations, two waves so global indexes take part; the suffix
    index's compiled core (where built) and its pure-Python reference."""
    monkeypatch.setenv("SPECJAX_SUFFIX_CORE", core)
    drafter, rng, checked = SHIPPED[name](), np.random.default_rng(1), 0
    for wave in range(2):
        rids = [(wave, r) for r in range(3)]
        for rid in rids:
            drafter.start_request(rid, rng.integers(0, 6, 40).tolist())
        for _ in range(12):
            proposals = [drafter.propose(rid, 16) for rid in rids]
            check_proposals(proposals, drafter, 16, 6)
            checked += sum(len(p) for p in proposals)
            for rid in rids:
                drafter.observe(rid, rng.integers(0, 6, int(rng.integers(1, 4))).tolist())
        for rid in rids:
            drafter.stop_request(rid)
    assert checked > 100  # real trees were checked, not empty ones


def test_a_learning_drafter_serves_one_engine_unless_sharing_is_explicit():
    drafter = SuffixDecodingDrafter(min_token_prob=0.0)
    first = Engine(MODEL, drafter, draft_capacity=CAPACITY, attention="xla")
    with pytest.raises(DrafterAlreadyAttached, match="fresh SuffixDecodingDrafter.*share_drafter_state=True"):
        Engine(MODEL, drafter, draft_capacity=CAPACITY, attention="xla")
    del first
    gc.collect()  # the first engine is gone, but what it taught the drafter is not
    with pytest.raises(DrafterAlreadyAttached):
        Engine(MODEL, drafter, draft_capacity=CAPACITY, attention="xla")
    Engine(MODEL, drafter, draft_capacity=CAPACITY, attention="xla", share_drafter_state=True)


def test_why_sharing_must_be_explicit_the_second_engine_inherits_the_index():
    """The same requests on a second engine: a shared suffix drafter makes them look far cheaper."""
    drafter = SuffixDecodingDrafter(min_token_prob=0.0)
    fresh = Engine(MODEL, drafter, draft_capacity=CAPACITY, attention="xla").generate(PROMPTS, 24)
    shared = Engine(MODEL, drafter, draft_capacity=CAPACITY, attention="xla",
                    share_drafter_state=True).generate(PROMPTS, 24)
    assert [r.token_ids for r in shared] == [r.token_ids for r in fresh]
    assert sum(r.target_passes for r in shared) < sum(r.target_passes for r in fresh)


def test_a_drafter_without_cross_request_state_may_serve_several_engines():
    drafter = PromptLookupDrafter()
    for _ in range(2):
        results = Engine(MODEL, drafter, draft_capacity=CAPACITY, attention="xla").generate(PROMPTS, 8)
        assert [r.token_ids for r in results] == greedy_generate(MODEL, PROMPTS, 8)
