"""Trace replay: acceptance counting, trace loading, the CLI, and the shared traces when present."""

from __future__ import annotations

import gzip
import json
import pathlib
import subprocess
import sys
import types

import pytest

from specjax.engine.replay import (ReplayConfig, SpecjaxBackend, TraceRequest, accepted_length, arctic_cache_class,
                                   load_traces, main, replay, run)

SPIDER = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "spider_train_others_gold.jsonl.gz"


def write_traces(path: pathlib.Path, rows: list[dict]) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def test_accepted_length_follows_the_matching_branch():
    tokens, parents = [5, 6, 7, 8], [-1, -1, 1, 2]  # 5 | 6 -> 7 -> 8
    assert accepted_length(tokens, parents, [6, 7, 9]) == 2
    assert accepted_length(tokens, parents, [6, 7, 8, 1]) == 3
    assert accepted_length(tokens, parents, [5, 7]) == 1
    assert accepted_length(tokens, parents, [9]) == 0
    assert accepted_length([], [], [1, 2]) == 0


def test_load_traces_reads_plain_and_gzipped_jsonl(tmp_path):
    rows = [{"prompt_ids": [1, 2], "response_ids": [3], "task": "a"}, {"prompt_ids": [4], "response_ids": [5, 6]}]
    for name in ("t.jsonl", "t.jsonl.gz"):
        loaded = load_traces(write_traces(tmp_path / name, rows))
        assert loaded == [TraceRequest([1, 2], [3], "a"), TraceRequest([4], [5, 6], "default")]


@pytest.mark.parametrize("row, problem", [
    ({"prompt_ids": [1]}, "KeyError"),
    ({"prompt_ids": [1], "response_ids": [-3]}, "non-negative"),
    ({"prompt_ids": "abc", "response_ids": [1]}, "integers"),
])
def test_bad_trace_rows_name_the_line(tmp_path, row, problem):
    path = write_traces(tmp_path / "bad.jsonl", [{"prompt_ids": [1], "response_ids": [2]}, row])
    with pytest.raises(ValueError, match=rf"bad.jsonl:2: .*{problem}"):
        load_traces(path)


def test_a_repeated_response_is_drafted_whole_the_second_time():
    response = list(range(100, 140))
    requests = [TraceRequest([1, 2, 3], response, "t"), TraceRequest([9, 9], response, "t")]
    backend = SpecjaxBackend(ReplayConfig())
    first_stats, = replay(requests[:1], [backend])
    second_stats, = replay(requests[1:], [backend])
    first, second = first_stats["t"], second_stats["t"]
    assert first.accepted == [0] * len(response)  # nothing to draft from: one token per step
    # The new prompt matches nothing; then each step's budget is its match length (all the
    # response so far), which doubles it plus one until the response ends (no bonus token).
    assert second.accepted == [0, 1, 3, 7, 15, 9]


def test_prefill_fills_the_global_index_first():
    response = list(range(200, 230))
    requests = [TraceRequest([7], response)]
    cold = run(requests, [SpecjaxBackend(ReplayConfig())])[0]
    warm = run(requests, [SpecjaxBackend(ReplayConfig())], prefill=[TraceRequest([0], response)])[0]
    assert cold["tokens_per_step"] == 1.0
    assert warm["tokens_per_step"] > 3.0


def test_report_has_per_task_and_overall_numbers():
    requests = [TraceRequest([1], [5, 6, 7, 5, 6, 7], "a"), TraceRequest([2], [8, 9, 8, 9], "b")]
    result = run(requests, [SpecjaxBackend(ReplayConfig(tree=True))])[0]
    assert set(result["tasks"]) == {"a", "b"}
    assert result["response_tokens"] == 10
    assert result["tokens_per_step"] == pytest.approx(10 / result["steps"])
    assert result["steps"] == sum(task["steps"] for task in result["tasks"].values())
    assert result["bytes_per_token"] > 0


def test_main_prints_one_json_object_and_writes_it(tmp_path, capsys):
    traces = write_traces(tmp_path / "t.jsonl", [{"prompt_ids": [1, 2], "response_ids": [3, 4, 3, 4, 3, 4]}] * 3)
    output = tmp_path / "out.json"
    assert main(["--traces", traces, "--tree", "--json", "--no-reference", "--output", str(output)]) == 0
    printed = json.loads(capsys.readouterr().out)
    for key in ("tokens_per_step", "mean_accepted", "spec_us_p50", "spec_us_p99", "update_us_p50", "bytes_per_token"):
        assert isinstance(printed[key], float), key
    assert printed["config"]["tree"] is True and printed["reference"] is None
    assert json.loads(output.read_text()) == printed


def test_main_prints_a_table(tmp_path, capsys):
    traces = write_traces(tmp_path / "t.jsonl", [{"prompt_ids": [1], "response_ids": [3, 4, 3, 4]}])
    assert main(["--traces", traces, "--no-reference"]) == 0
    out = capsys.readouterr().out
    assert "tokens/step" in out and "specjax" in out


def test_bad_options_are_rejected(tmp_path):
    traces = write_traces(tmp_path / "t.jsonl", [{"prompt_ids": [1], "response_ids": [3]}])
    with pytest.raises(SystemExit):
        main(["--traces", traces, "--max-depth", "0"])
    with pytest.raises(ValueError, match="min_token_prob"):
        main(["--traces", traces, "--min-token-prob", "2", "--no-reference"])


def test_module_runs_as_a_script(tmp_path):
    traces = write_traces(tmp_path / "t.jsonl", [{"prompt_ids": [1], "response_ids": [3, 4]}])
    done = subprocess.run([sys.executable, "-m", "specjax.engine.replay", "--traces", traces, "--json",
                           "--no-reference"], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout)["response_tokens"] == 2


@pytest.mark.skipif(not SPIDER.exists(), reason="shared traces not present")
@pytest.mark.parametrize("tree", [False, True])
def test_spider_traces_draft_at_least_as_well_as_the_reference(tree):
    requests = load_traces(str(SPIDER))[:400]
    backends = [SpecjaxBackend(ReplayConfig(tree=tree))]
    cache_class = arctic_cache_class()
    if cache_class is not None:
        from specjax.engine.replay import ArcticBackend

        backends.append(ArcticBackend(ReplayConfig(tree=tree), cache_class))
    results = run(requests, backends)
    assert results[0]["tokens_per_step"] > 3.0  # 1.0 without drafting
    if cache_class is not None:
        assert results[0]["tokens_per_step"] >= results[1]["tokens_per_step"]


# ---------------------------------------------------------------- budgets, sessions in flight, the committed sample

SAMPLE = pathlib.Path(__file__).resolve().parent / "data" / "agentic_sample.jsonl.gz"
AGENTIC = [pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / name
           for name in ("swe_minisweagent_gemini3pro_public.jsonl.gz", "tau_airline_gpt4o_public.jsonl.gz")]


class RecordingBackend:
    """Drafts nothing; records the order of starts and stops."""

    name = "recording"

    def __init__(self):
        self.events: list[tuple[str, int]] = []
        self.active: set[int] = set()
        self.most_active = 0

    def start(self, request_id, prompt):
        self.events.append(("start", request_id))
        self.active.add(request_id)
        self.most_active = max(self.most_active, len(self.active))

    def speculate(self, request_id):
        return [], [], 0.0

    def extend(self, request_id, tokens):
        return 0.0

    def stop(self, request_id):
        self.events.append(("stop", request_id))
        self.active.remove(request_id)


def test_sessions_in_flight_run_their_calls_in_order():
    requests = [TraceRequest([1], [2, 3], "t", "a"), TraceRequest([1], [4], "t", "b"),
                TraceRequest([1], [5, 6, 7], "t", "a"), TraceRequest([1], [8], "t", "c")]
    backend = RecordingBackend()
    stats, = replay(requests, [backend], concurrency=2)
    events = backend.events
    assert backend.most_active == 2
    assert events.index(("stop", 0)) < events.index(("start", 2))  # a's second call follows its first
    assert events.index(("start", 3)) > events.index(("stop", 1))  # c waits for a free slot
    assert stats["t"].response_tokens == 7 and len(stats["t"].accepted) == 7  # one token per step


def test_budget_json_reports_drafted_nodes(tmp_path, capsys):
    traces = write_traces(tmp_path / "t.jsonl", [{"prompt_ids": [1, 2], "response_ids": [3, 4, 3, 4, 3, 4]}] * 3)
    assert main(["--traces", traces, "--tree", "--budget", "8", "--json", "--no-reference"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["config"]["budget"] == 8 and 0 < printed["mean_drafted"] <= 8
    with pytest.raises(SystemExit):
        main(["--traces", traces, "--budget", "0"])


@pytest.mark.skipif(not SAMPLE.exists(), reason="committed sample missing")
def test_committed_sample_budgeted_trees_beat_the_rule():
    """A tau-bench task's 4 trials and a SWE agent's first calls (tests/data/README.md)."""
    requests = load_traces(str(SAMPLE))
    assert {r.task for r in requests} == {"tau-bench-airline", "swe-agent"}
    rule, = run(requests, [SpecjaxBackend(ReplayConfig(tree=True))])
    budget, = run(requests, [SpecjaxBackend(ReplayConfig(tree=True, budget=64))])
    shared, alone = (run(requests, [SpecjaxBackend(ReplayConfig(tree=True, budget=64, max_shared_requests=n))],
                         concurrency=4)[0] for n in (8, 0))
    assert set(budget["tasks"]) == {"tau-bench-airline", "swe-agent"}
    assert budget["response_tokens"] == rule["response_tokens"] == sum(len(r.response_ids) for r in requests)
    assert budget["tokens_per_step"] > 1.2 * rule["tokens_per_step"]
    assert rule["mean_drafted"] < budget["mean_drafted"] <= 64
    # The trials run at once: drafting from each other's partial outputs pays.
    assert shared["tokens_per_step"] > 1.05 * alone["tokens_per_step"]


@pytest.mark.skipif(not all(p.exists() for p in AGENTIC), reason="shared agentic traces not present")
@pytest.mark.parametrize("path", AGENTIC, ids=["swe", "tau"])
def test_agentic_traces_budgeted_trees_beat_the_rule(path):
    requests = load_traces(str(path))[:60]
    rule, = run(requests, [SpecjaxBackend(ReplayConfig(tree=True))])
    budget, = run(requests, [SpecjaxBackend(ReplayConfig(tree=True, budget=64))])
    assert budget["tokens_per_step"] > 1.1 * rule["tokens_per_step"]


class FakeArcticCache:
    """Stands in for ArcticInference's cache: drafts round(2 x factor) never-matching tokens, capped."""

    class _Tree:
        def estimate_memory(self):
            return 0

    def __init__(self, max_tree_depth, max_cached_requests):
        self._global_tree = self._Tree()
        self.cached_requests = []

    def start_request(self, request_id, prompt):
        pass

    def speculate(self, request_id, context, max_spec_tokens, max_spec_factor, **_):
        n = min(round(2 * max_spec_factor), max_spec_tokens)
        return types.SimpleNamespace(token_ids=[10**6] * n, parents=list(range(-1, n - 1)))

    def add_active_response(self, request_id, tokens):
        pass

    def stop_request(self, request_id):
        pass


def test_equal_nodes_search_bisects_the_factor():
    from specjax.engine.replay import arctic_at_equal_nodes

    requests = [TraceRequest([1], [2, 3, 4, 5])]
    config = ReplayConfig(tree=True, budget=32)
    found = arctic_at_equal_nodes(requests, config, FakeArcticCache, target_nodes=10.0)
    closest = min(found["runs"], key=lambda r: abs(r["mean_drafted"] - 10.0))
    assert closest["mean_drafted"] == pytest.approx(10.0, rel=0.1)
    assert closest["max_spec_factor"] == pytest.approx(5.0, rel=0.15)
    assert found["tokens_per_step"] == pytest.approx(1.0)  # nothing matches: one token per step
    beyond = arctic_at_equal_nodes(requests, config, FakeArcticCache, target_nodes=40.0)  # capped at 32
    assert beyond["tokens_per_step"] is None and beyond["max_spec_factor"] == 32.0
