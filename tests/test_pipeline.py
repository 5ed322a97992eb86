"""Two lanes in ping-pong: host drafting for one half of a batch overlaps the other half's device step."""

import pytest

from engine_helpers import tiny_model
from specjax.drafters.prompt_lookup import PromptLookupDrafter
from specjax.engine.autotune import pipelined_round_pays
from specjax.engine.engine import Engine
from specjax.engine.plain import greedy_generate

PROMPTS = [[3, 9, 4, 3, 9, 4, 3, 9], [17, 2, 5, 17, 2, 5], [8, 8, 1, 8, 8], [40, 41, 42, 40, 41],
           [6, 7, 6, 7, 6, 7, 6], [11, 12, 13, 11]]


def _traced_engine(model, pipeline):
    """An engine whose steps, reads and drafts are logged in order as (event, lane rows or request id)."""
    engine = Engine(model, PromptLookupDrafter(max_ngram=2, max_branches=2), draft_capacity=4, pipeline=pipeline)
    events = []
    real_dispatch, real_collect, real_propose = engine._dispatch, engine._collect, engine.drafter.propose

    def dispatch(lane, book):
        real_dispatch(lane, book)
        events.append(("dispatch", tuple(lane.rows)))

    def collect(lane, book, stop, progress):
        events.append(("collect", tuple(lane.rows)))
        real_collect(lane, book, stop, progress)

    def propose(rid, max_tokens):
        events.append(("propose", rid))
        return real_propose(rid, max_tokens)

    engine._dispatch, engine._collect, engine.drafter.propose = dispatch, collect, propose
    return engine, events


def _overlapped_drafts(events, rids_of_lane) -> int:
    """Drafts made for one lane while the other lane had a step dispatched and not yet read."""
    in_flight, count = set(), 0
    for kind, what in events:
        if kind == "dispatch":
            in_flight.add(what)
        elif kind == "collect":
            in_flight.discard(what)
        elif any(rids != lane and what in rids_of_lane[rids] for lane in in_flight for rids in rids_of_lane):
            count += 1
    return count


@pytest.mark.parametrize("pipeline", [True, False])
def test_lanes_are_lossless_and_overlap_only_when_pipelined(pipeline):
    model = tiny_model(7)
    expected = greedy_generate(model, PROMPTS, 24)
    engine, events = _traced_engine(model, pipeline)
    results = engine.generate(PROMPTS, max_new_tokens=24)
    assert [r.token_ids for r in results] == expected
    lanes = sorted({what for kind, what in events if kind == "dispatch"})
    assert len(lanes) == (2 if pipeline else 1)
    assert sum(r.accepted_draft_tokens for r in results) > 0  # the drafts were used
    # A fresh engine numbers its requests 0, 1, ... by batch row, so a lane's rows name its requests.
    rids_of_lane = {lane: set(lane) for lane in lanes}
    overlapped = _overlapped_drafts(events, rids_of_lane)
    drafts = sum(kind == "propose" for kind, _ in events)
    if pipeline:
        assert overlapped > drafts // 2
    else:
        assert overlapped == 0


def test_pipelined_engine_keeps_stop_strings_per_lane():
    """Rows of the second lane that end early do not disturb the first (budgets of 3 and 24)."""
    model = tiny_model(3)
    engine = Engine(model, PromptLookupDrafter(), draft_capacity=2, pipeline=True)
    short = engine.generate(PROMPTS, max_new_tokens=3)
    long = engine.generate(PROMPTS, max_new_tokens=24)
    assert [r.token_ids for r in short] == greedy_generate(model, PROMPTS, 3)
    assert [r.token_ids for r in long] == greedy_generate(model, PROMPTS, 24)


def test_pipelined_round_cost_model():
    # Drafting negligible: two half steps cost more than one full step.
    assert not pipelined_round_pays(full_step_s=1.0, half_step_s=0.7, drafting_s=0.05)
    # Drafting as long as a step and a sublinear batch: overlap hides most of it.
    assert pipelined_round_pays(full_step_s=1.0, half_step_s=0.6, drafting_s=1.0)
    # A step cost independent of the batch (weights-bound decode): two lanes double the device work,
    # which drafting 0.8 of a step does not repay ...
    assert not pipelined_round_pays(full_step_s=1.0, half_step_s=1.0, drafting_s=0.8)
    # ... but drafting three steps' worth does.
    assert pipelined_round_pays(full_step_s=1.0, half_step_s=1.0, drafting_s=3.0)


def test_auto_pipelines_only_where_the_measured_costs_say_it_pays():
    model = tiny_model(5)
    engine = Engine(model, PromptLookupDrafter(), draft_capacity=4)
    rows, max_len = 8, 128
    engine._draft_s_per_row = 1.0
    assert len(engine._lanes(rows, max_len)) == 1  # on a CPU the steps run on the drafting cores
    engine._steps_share_host_cores = False  # as on a TPU / GPU
    engine._draft_s_per_row = None
    assert len(engine._lanes(rows, max_len)) == 1  # nothing measured yet
    engine._step_costs[(rows, max_len)] = {4: 1e-3}
    engine._step_costs[(rows // 2, max_len)] = {4: 0.6e-3}
    engine._draft_s_per_row = 1e-3 / rows / 100  # drafting 1% of a step
    assert len(engine._lanes(rows, max_len)) == 1
    engine._draft_s_per_row = 1e-3 / rows  # drafting a whole step
    lanes = engine._lanes(rows, max_len)
    assert [list(lane) for lane in lanes] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert len(Engine(model, PromptLookupDrafter(), draft_capacity=4, pipeline=False)._lanes(rows, max_len)) == 1
    assert len(Engine(model, None, pipeline=True)._lanes(rows, max_len)) == 1  # no drafter, nothing to overlap
    with pytest.raises(ValueError, match="pipeline"):
        Engine(model, None, pipeline="yes")

