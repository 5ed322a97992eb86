"""Tree sizes compile on first use: the auto size reaches a size, and compiles it, only once the
sizes below it are measured and the drafter's calibrated claims say it could pay."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine_helpers import WrongDrafter, tiny_model
from specjax.drafters.factory import default_max_capacity, load_drafter
from specjax.drafters.prompt_lookup import PromptLookupDrafter
from specjax.engine import device_loop
from specjax.engine import engine as engine_module
from specjax.engine.autotune import CapacityPolicy, ChunkPolicy, capacity_buckets
from specjax.engine.engine import Engine
from specjax.engine.plain import greedy_generate
from specjax.models.embedded import default_model_dir
from specjax.models.embedded.toy_corpus import sql_prompts
from specjax.models.loading import load_model

COSTS = {0: 1.0, 1: 1.05, 2: 1.1, 4: 1.2, 8: 1.6, 16: 2.4}
SIZES = capacity_buckets(16)
CONFIDENT = [np.array([0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4])] * 4


def test_the_host_policy_grows_one_measured_size_at_a_time():
    policy = CapacityPolicy(costs={0: COSTS[0]}, sizes=SIZES)
    chosen = []
    for _ in range(6):
        t = policy.choose(CONFIDENT, num_active=4)
        chosen.append(t)
        if t not in policy.costs:  # as the Engine does: measure (and compile) a size before its first step
            policy.costs[t] = COSTS[t]
        policy.record(t, COSTS[t], predicted=1.0, accepted=1)
    assert chosen == [1, 2, 4, 8, 8, 8]  # one new size per step, each reached at the cost of the one below
    assert set(policy.costs) == {0, 1, 2, 4, 8}  # 16 never looked worth trying: never compiled
    # Once measured, the lazy policy chooses as the one measured up front (see test_autotune).
    eager = CapacityPolicy(costs=dict(COSTS))
    assert policy.choose(CONFIDENT, 4) == eager.choose(CONFIDENT, 4) == 8


def test_the_host_policy_never_compiles_a_size_that_cannot_pay():
    policy = CapacityPolicy(costs={0: COSTS[0]}, sizes=SIZES)
    hopeless = [np.array([0.01, 0.005])] * 4
    assert all(policy.choose(hopeless, 4) == 0 for _ in range(5))
    # Even at the cheapest cost a bigger tree could have (the plain step's), 1.05x is not reached.
    assert set(policy.costs) == {0}


def test_the_chunk_policy_measures_plain_and_the_smallest_tree_then_grows():
    policy = ChunkPolicy(costs={}, buckets=(0, 1, 2, 4, 8), warmed={0, 1, 2, 4, 8})  # each chunk timed
    chosen = []
    for _ in range(4):
        t = policy.choose()
        chosen.append(t)
        # The drafter claims 0.9 of a token at T=1 and 0.95 at every larger size: 2 looks worth a
        # try at T=1's cost, not once measured (each costs what COSTS says), and 4 not even at 2's.
        policy.record(t, 8 * COSTS[t], steps=8, row_steps=8, claimed=[0.0, 8 * 0.9] + [8 * 0.95] * 3,
                      accepted=int(8 * 0.9) if t else 0)
    assert chosen == [0, 1, 2, 1]
    assert 4 not in policy.costs and 8 not in policy.costs


def test_the_chunk_policy_opens_a_bigger_tree_only_after_accepted_tokens():
    """Flat costs (a GPU's small trees) and confident claims: calibration alone would still let
    the claims through size after size (each 4-step chunk of nothing leaves a quarter of them)."""
    claims = [0.0] + [8 * sum(0.95 ** k for k in range(1, t + 1)) for t in (1, 2, 4, 8)]

    def run(accepted_at_one: int, evidence: bool = True) -> list[int]:
        policy = ChunkPolicy(costs={}, buckets=(0, 1, 2, 4, 8), warmed={0, 1, 2, 4, 8})
        if not evidence:  # claims and calibration only
            policy._frontier_earned = lambda costs: True
        chosen = []
        for _ in range(6):
            t = policy.choose()
            chosen.append(t)
            policy.record(t, 4.0, steps=4, row_steps=8, claimed=claims, accepted=accepted_at_one * (t > 0))
        return chosen

    assert set(run(accepted_at_one=0)) == {0, 1}
    assert set(run(accepted_at_one=4)) == {0, 1, 2, 4, 8}  # half a token per row-step: grows
    # Control: without the evidence rule, the wrong drafter grows too.
    assert 2 in run(accepted_at_one=0, evidence=False)


def test_the_first_generate_of_the_main_job_compiles_only_the_sizes_it_uses():
    """The README's main job offline (the embedded model, its default drafter: the suffix index warm
    from the shipped history, auto tree size), batch 16. Each tree size's step is one program."""
    model = load_model(default_model_dir(), dtype=jnp.float32)
    engine = Engine(model, load_drafter("auto", model), max_draft_capacity=default_max_capacity())
    jax.clear_caches()
    # 3 new tokens are at most 3 steps, and the policy reaches one new size per step: whatever the
    # measured costs (they vary with the machine's load), at most sizes 1, 2, 4 besides the plain step.
    results = engine.generate(sql_prompts(16, seed=0), max_new_tokens=3)
    used = {s.capacity for r in results for s in r.trace}
    compiled = engine_module.step._cache_size()
    # The plain step is measured before the first step (every choice compares with it).
    assert compiled == len(used | {0})
    assert compiled < len(capacity_buckets(default_max_capacity()))  # eager: every size, here 5


def test_warmup_still_compiles_every_size_ahead():
    engine = Engine(tiny_model(0), PromptLookupDrafter(), max_draft_capacity=4)
    jax.clear_caches()
    report = engine.warmup(batch_size=2, prompt_len=5, max_new_tokens=8)
    assert {k for k in report["compile_s"] if k.startswith("step")} == {"step T=0", "step T=1", "step T=2",
                                                                       "step T=4"}
    compiled = engine_module.step._cache_size()
    prompts = [[3, 9, 4, 3, 9], [1, 2, 3, 1, 2]]
    results = engine.generate(prompts, 8)
    assert engine_module.step._cache_size() == compiled  # the generate compiled no step
    assert [r.token_ids for r in results] == greedy_generate(tiny_model(0), prompts, 8)
    # lazy_compile=False (the CLI's timed runs): every size measured when a batch shape is first seen.
    ahead = Engine(tiny_model(0), PromptLookupDrafter(), max_draft_capacity=4, lazy_compile=False)
    ahead.generate(prompts, 8)
    assert [set(costs) for costs in ahead._step_costs.values()] == [{0, 1, 2, 4}]


def test_the_device_loop_compiles_only_the_sizes_it_runs():
    target = tiny_model(2)
    prompts = [[5, 17, 33, 8], [9, 42, 61, 7, 7, 3, 30, 11]]
    expected = greedy_generate(target, prompts, 32)
    never = min(set(range(64)) - {t for out in expected for t in out})
    engine = Engine(target, WrongDrafter(never), max_draft_capacity=8)
    jax.clear_caches()
    results = engine.generate(prompts, 32)
    (policy,) = engine._chunk_policies.values()
    ran = {t for t, _ in policy.history}
    assert device_loop.run_steps._cache_size() == len(ran)
    # T=1 accepted nothing, so no bigger tree is tried, whatever the timings: those never compiled.
    assert ran == {0, 1}
    assert [r.token_ids for r in results] == expected


def test_the_compile_clock_counts_compiling_once_and_nothing_else():
    """Timed runs subtract ``CompileClock.seconds``: it must hold the compile time, nested programs
    once, and nothing of a cached program's run."""
    import time

    from specjax.engine.compile_cache import CompileClock

    @jax.jit
    def inner(x):
        return jnp.tanh(x) @ x.T

    @jax.jit
    def outer(x):
        return inner(x) + inner(2 * x)

    x = jnp.ones((64, 48))
    with CompileClock() as first:
        start = time.perf_counter()
        outer(x).block_until_ready()
        wall = time.perf_counter() - start
    assert 0 < first.seconds <= wall
    with CompileClock() as cached:
        for _ in range(20):
            outer(x).block_until_ready()
    assert cached.seconds == 0.0


def test_the_compile_clock_merges_overlapping_spans():
    from specjax.engine.compile_cache import CompileClock

    clock = CompileClock()
    for span in [(0.0, 1.0), (0.5, 2.0), (3.0, 4.0), (3.2, 3.5)]:
        clock._record("/jax/core/compile/jaxpr_trace_duration", *span)
    clock._record("/jax/some/other_event", 10.0, 20.0)  # not a compile event
    assert clock.seconds == pytest.approx(3.0)
