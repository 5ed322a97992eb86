"""Continuous batching over the paged cache: the scheduler's outputs equal plain decoding's.

Requests arrive over time, are cancelled, share prompt prefixes and mix
prefill chunks with draft trees in one packed step; every completed greedy
request equals offline plain greedy decoding, every sampled one plain sampling
with its seed, and no page or slot leaks. Two wrong steps (no compaction of
the accepted rows; reading another sequence's pages) are kept as negative
controls: each must break the equality.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from engine_helpers import GarbageDrafter, OracleTreeDrafter, tiny_model
from specjax.drafters.prompt_lookup import PromptLookupDrafter
from specjax.engine import paged_steps
from specjax.engine.plain import generate_plain, greedy_generate
from specjax.engine.row_policy import RowPolicy
from specjax.engine.scheduler import QueueFull, Request, Scheduler

VOCAB, MAX_NEW = 64, 12
# One pool and slot layout for every test, so the step compiles once per row bucket for all of them.
LAYOUT = dict(max_slots=8, num_pages=64, page_size=4, max_pages_per_seq=16, max_tree=7, prefill_budget=16)
SHAPES = [[-1, 0, 1, 2], [-1, -1, 1, 2, 0], [-1, 0, 0, 1, 2, 3, 4], [-1, -1, -1, 2, 3]]


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab=VOCAB)


def make_prompts(n: int, seed: int, system_len: int = 9, max_len: int = 40) -> list[list[int]]:
    """Prompts of many lengths; a third start with one shared "system prompt", a few repeat a pattern
    (so prompt lookup finds matches)."""
    rng = np.random.default_rng(seed)
    system = rng.integers(0, VOCAB, system_len).tolist()
    prompts = []
    for i in range(n):
        body = rng.integers(0, VOCAB, int(rng.integers(1, max_len - system_len))).tolist()
        if i % 5 == 1:
            body = (body[:4] * 4)[: len(body) + 4]
        prompts.append(system + body if i % 3 == 0 else body)
    return prompts


@pytest.fixture(scope="module")
def greedy_refs(model):
    prompts = make_prompts(64, seed=1)
    return prompts, greedy_generate(model, prompts, MAX_NEW)


def serve(model, prompts, budgets, *, oracle_refs=None, cancel_every=0, seed=0, arrivals_per_step=3, settings=None,
          drafter=None, setup=lambda sched: None, **options):
    """Run requests through a Scheduler with staggered arrivals and cancellations.

    Even requests get an oracle tree drafter (right continuation with wrong siblings) when
    ``oracle_refs`` is given; the rest the scheduler's prompt lookup. Returns (results, rids,
    cancelled rids, the scheduler, {"mixed": steps mixing prefill with trees, "shared": requests
    that started on shared prefix pages, "drafted": draft nodes verified}); ``settings[i]`` are
    request i's sampling fields; ``drafter`` replaces the scheduler's prompt lookup, ``options`` go
    to the Scheduler and ``setup`` gets it before the first request.
    """
    rng = np.random.default_rng(seed)
    sched = Scheduler(model, drafter=drafter or PromptLookupDrafter(max_ngram=2), **LAYOUT, **options)
    setup(sched)
    shared = count_shared_prefixes(sched)
    oracle = None
    if oracle_refs is not None:
        oracle = OracleTreeDrafter({tuple(p): r for p, r in zip(prompts, oracle_refs)}, SHAPES, follow_prob=0.7,
                                   vocab=VOCAB, seed=seed)
    pending = list(range(len(prompts)))
    rids, cancelled, mixed, drafted = {}, set(), 0, 0
    while pending or sched.has_work():
        for i in pending[:arrivals_per_step]:
            drafter = oracle if (oracle is not None and i % 2 == 0) else None
            rids[i] = sched.submit(Request(prompts[i], budgets[i], drafter=drafter, **(settings or {}).get(i, {})))
        pending = pending[arrivals_per_step:]
        if cancel_every and rids and rng.random() < 1 / cancel_every:
            rid = rids[int(rng.choice(list(rids)))]
            if sched.cancel(rid):
                cancelled.add(rid)
        sched.step()
        mixed += sched.last_step.tree_slots > 0 and sched.last_step.prefill_slots > 0
        drafted += sched.last_step.drafted
        problems = sched.audit()
        assert not problems, problems
    return sched.results, rids, cancelled, sched, {"mixed": mixed, "shared": sum(n > 0 for n in shared),
                                                   "drafted": drafted}


def count_shared_prefixes(sched: Scheduler) -> list[int]:
    """Spy on the allocator: the list fills with each admitted request's prompt tokens found cached."""
    shared, add = [], sched.allocator.add
    sched.allocator.add = lambda rid, prompt: shared.append(add(rid, prompt)) or shared[-1]
    return shared


def test_scheduler_greedy_equals_plain_under_staggered_arrivals_and_cancellations(model, greedy_refs):
    prompts, refs = greedy_refs
    budgets = [1 + i % MAX_NEW for i in range(len(prompts))]
    results, rids, cancelled, sched, seen = serve(model, prompts, budgets, oracle_refs=refs, cancel_every=6)
    finished = [i for i, rid in rids.items() if results[rid].status == "finished"]
    assert len(finished) >= 48 and 4 <= len(cancelled) <= 16
    for i, rid in rids.items():
        tokens = results[rid].tokens
        if rid in cancelled:
            assert tokens == refs[i][: len(tokens)], f"request {i} (cancelled)"
        else:
            assert tokens == refs[i][: budgets[i]], f"request {i}"
    assert sum(results[rids[i]].accepted for i in finished) > 40  # trees were verified and accepted
    assert seen["mixed"] > 5 and seen["shared"] > 5  # chunks shared steps with trees; prompts shared pages
    assert sched.allocator.num_in_use == 0 and not sched.audit()


def test_scheduler_auto_tree_greedy_equals_plain(model, greedy_refs):
    """The auto size per slot, on this machine's real step timings, changes no output."""
    prompts, refs = greedy_refs
    budgets = [1 + i % MAX_NEW for i in range(len(prompts))]
    results, rids, cancelled, sched, _ = serve(model, prompts, budgets, oracle_refs=refs, cancel_every=6,
                                               auto_tree=True)
    for i, rid in rids.items():
        tokens = results[rid].tokens
        assert tokens == refs[i][: len(tokens) if rid in cancelled else budgets[i]], f"request {i}"
    assert sched.policy.costs and sched.allocator.num_in_use == 0 and not sched.audit()


class FrozenCosts(RowPolicy):
    """Step costs fixed per row bucket, so the choice does not depend on a shared CPU's timing."""

    def record(self, rows, seconds, claimed, accepted):
        super().record(rows, self.costs[self.bucket(rows)], claimed, accepted)


class TrustingFrozenCosts(FrozenCosts):
    """Negative control: the drafter's claims taken as they are (no calibration)."""

    def calibration(self, slot_claimed, slot_accepted):
        return 1.0


GENTLE_COSTS = {8: 1.0, 16: 1.2, 32: 1.5, 64: 2.0, 128: 3.0}  # a bigger step costs a little more


def frozen(policy_class):
    def setup(sched):
        sched.policy = policy_class(sched.policy.buckets, costs=dict(GENTLE_COSTS), _compiled=set(GENTLE_COSTS))
    return setup


@pytest.mark.parametrize("policy_class", [FrozenCosts, TrustingFrozenCosts])
def test_scheduler_auto_tree_stops_verifying_a_drafter_that_is_never_right(model, greedy_refs, policy_class):
    prompts, refs = greedy_refs
    prompts, refs = prompts[:24], refs[:24]
    budgets = [MAX_NEW] * len(prompts)
    results, rids, _, _, seen = serve(model, prompts, budgets, drafter=GarbageDrafter(VOCAB), auto_tree=True,
                                      setup=frozen(policy_class), arrivals_per_step=8)
    assert all(results[rids[i]].tokens == refs[i] for i in range(len(prompts)))
    whole = sum(min(LAYOUT["max_tree"], 8, b - 1) for b in budgets) * (MAX_NEW - 1)  # about every node offered
    if policy_class is FrozenCosts:
        assert seen["drafted"] < 0.15 * whole, seen
    else:  # the control keeps verifying the confident garbage
        assert seen["drafted"] > 0.5 * whole, seen


def test_scheduler_sampled_equals_plain_sampling_with_the_same_seeds(model):
    prompts = make_prompts(10, seed=2, max_len=24)
    seeds = [100 + 7 * i for i in range(len(prompts))]
    settings = dict(temperature=0.8, top_p=0.9)
    expected = generate_plain(model, prompts, MAX_NEW, seed=seeds, **settings)
    requests = {i: dict(seed=seeds[i], **settings) for i in range(len(prompts))}
    greedy = make_prompts(4, seed=3, max_len=24)  # greedy requests in the same steps
    results, rids, _, _, _ = serve(model, prompts + greedy, [MAX_NEW] * (len(prompts) + len(greedy)),
                                 settings=requests)
    for i in range(len(prompts)):
        assert results[rids[i]].tokens == expected[i], f"request {i}"
    assert sum(results[rids[i]].accepted for i in range(len(prompts))) > 0
    greedy_expected = greedy_generate(model, greedy, MAX_NEW)
    for j, ref in enumerate(greedy_expected):
        assert results[rids[len(prompts) + j]].tokens == ref


def test_scheduler_no_page_or_slot_leaks_after_1000_requests(model):
    rng = np.random.default_rng(4)
    systems = [rng.integers(0, VOCAB, n).tolist() for n in (4, 8, 13)]
    sched = Scheduler(model, drafter=PromptLookupDrafter(), max_queue=12, **LAYOUT)
    shared = count_shared_prefixes(sched)
    submitted, cancelled, full = [], 0, 0
    while len(submitted) < 1000 or sched.has_work():
        for _ in range(min(int(rng.integers(0, 8)), 1000 - len(submitted))):
            prompt = systems[int(rng.integers(0, 3))] + rng.integers(0, VOCAB, int(rng.integers(1, 12))).tolist()
            try:
                submitted.append(sched.submit(Request(prompt, int(rng.integers(1, 6)))))
            except QueueFull:
                full += 1
        live = [rid for rid in submitted[-60:] if sched.results[rid].status in ("queued", "running")]
        if live and rng.random() < 0.3:
            cancelled += sched.cancel(live[int(rng.integers(0, len(live)))])
        sched.step()
        assert sched.num_running <= LAYOUT["max_slots"]
        problems = sched.audit()
        assert not problems, problems
    statuses = [sched.results[rid].status for rid in submitted]
    assert len(submitted) == 1000 and set(statuses) == {"finished", "cancelled"} and cancelled > 50
    assert full > 0  # the bounded queue pushed back
    assert sum(1 for n in shared if n > 0) > 100  # prefix pages were shared
    alloc = sched.allocator
    assert alloc.num_in_use == 0 and alloc.num_free == alloc.num_pages and not alloc.audit()
    assert sched._slots == [None] * LAYOUT["max_slots"] and not sched._running


def test_scheduler_refuses_bad_requests_and_bounds_the_queue(model):
    sched = Scheduler(model, max_queue=1, **LAYOUT)
    for bad, match in ((Request([], 4), "non-empty"), (Request([VOCAB], 4), "token ids"),
                       (Request([1, 2], 0), "max_new_tokens"), (Request([1] * 70, 4), "pages"),
                       (Request([1, 2], 4, temperature=-1.0), "temperature"), (Request([1], 4, seed=-1), "seeds")):
        with pytest.raises(ValueError, match=match):
            sched.submit(bad)
    sched.submit(Request([1, 2, 3], 2))
    with pytest.raises(QueueFull):
        sched.submit(Request([1, 2, 3], 2))
    assert sched.cancel(0) and not sched.cancel(0) and not sched.has_work()


def _without_compaction(monkeypatch):
    monkeypatch.setattr(paged_steps, "compact_accepted", lambda k_pages, v_pages, *_: (k_pages, v_pages))


def _reading_the_next_sequence(monkeypatch):
    attention = paged_steps.ragged_tree_attention

    def wrong(q, k_pages, v_pages, page_tables, cached_lens, *args, **kwargs):
        return attention(q, k_pages, v_pages, jax.numpy.roll(page_tables, 1, axis=0), cached_lens, *args, **kwargs)

    monkeypatch.setattr(paged_steps, "ragged_tree_attention", wrong)


@pytest.mark.parametrize("break_step", [_without_compaction, _reading_the_next_sequence])
def test_scheduler_negative_controls_break_equality(model, greedy_refs, monkeypatch, break_step):
    """A step that keeps the verified rows where they are, or attends to another slot's pages,
    must make the equality fail (the checks above can see both)."""
    prompts, refs = greedy_refs
    prompts, refs = prompts[:16], refs[:16]
    break_step(monkeypatch)
    # A new function to jit: jax keys its trace cache on the function, and each control must trace anew.
    monkeypatch.setattr(paged_steps, "paged_step", jax.jit(
        lambda *args, **kwargs: paged_steps.paged_step_impl(*args, **kwargs),
        static_argnames=("cfg", "attention", "eos_ids", "max_q_len")))
    results, rids, _, _, _ = serve(model, prompts, [MAX_NEW] * len(prompts), oracle_refs=refs)
    assert any(results[rids[i]].tokens != refs[i] for i in range(len(prompts)))



def test_scheduler_stops_at_eos_inside_an_accepted_tree(model, greedy_refs):
    """EOS cuts a step's emission mid-path (the oracle drafts past it) and frees the slot at once."""
    prompts, refs = greedy_refs
    prompts, refs = prompts[:12], refs[:12]
    counts = np.bincount([t for ref in refs for t in ref[1:]], minlength=VOCAB)
    eos = int(np.argmax(counts))  # the most frequent later token: several requests end early
    eos_model = tiny_model(vocab=VOCAB, eos=(eos,))
    expected = greedy_generate(eos_model, prompts, MAX_NEW)
    results, rids, _, sched, _ = serve(eos_model, prompts, [MAX_NEW] * len(prompts), oracle_refs=refs)
    assert sum(len(e) < MAX_NEW for e in expected) >= 3
    for i in range(len(prompts)):
        assert results[rids[i]].tokens == expected[i], f"request {i}"
    assert sched.allocator.num_in_use == 0


def test_paged_scheduler_with_the_pallas_kernel_equals_plain(model, greedy_refs):
    """The Mosaic ragged kernel (interpreted on CPU) inside scheduled steps: the same outputs."""
    prompts, refs = greedy_refs
    prompts, refs = prompts[:4], refs[:4]
    sched = Scheduler(model, attention="pallas", **dict(LAYOUT, max_slots=2))
    oracle = OracleTreeDrafter({tuple(p): r for p, r in zip(prompts, refs)}, SHAPES, follow_prob=0.7, vocab=VOCAB)
    rids = [sched.submit(Request(p, 6, drafter=oracle)) for p in prompts]
    sched.run()
    assert [sched.results[rid].tokens for rid in rids] == [ref[:6] for ref in refs]
    assert sum(sched.results[rid].accepted for rid in rids) > 0
