"""Trace replay: acceptance counting, trace loading, the CLI, and the shared traces when present."""

from __future__ import annotations

import gzip
import json
import pathlib
import subprocess
import sys

import pytest

from specjax.drafters.replay import (ReplayConfig, SpecjaxBackend, TraceRequest, accepted_length, arctic_cache_class,
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
    done = subprocess.run([sys.executable, "-m", "specjax.drafters.replay", "--traces", traces, "--json",
                           "--no-reference"], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout)["response_tokens"] == 2


@pytest.mark.skipif(not SPIDER.exists(), reason="shared traces not present")
@pytest.mark.parametrize("tree", [False, True])
def test_spider_traces_draft_at_least_as_well_as_the_reference(tree):
    requests = load_traces(str(SPIDER))[:400]
    backends = [SpecjaxBackend(ReplayConfig(tree=tree))]
    cache_class = arctic_cache_class()
    if cache_class is not None:
        from specjax.drafters.replay import ArcticBackend

        backends.append(ArcticBackend(ReplayConfig(tree=tree), cache_class))
    results = run(requests, backends)
    assert results[0]["tokens_per_step"] > 3.0  # 1.0 without drafting
    if cache_class is not None:
        assert results[0]["tokens_per_step"] >= results[1]["tokens_per_step"]
