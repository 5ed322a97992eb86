"""The serving load benchmark on a handful of requests: its arrival pattern, its JSON, and that every
mode (continuous and static batching, with and without suffix drafting, and through the server on a
loopback port) gives the same greedy outputs."""

import json

from engine_helpers import load_benchmark


bench = load_benchmark("bench_serving")


def test_serve_bench_arrivals_follow_each_agents_responses_and_tool_calls():
    sessions = [[(10, 5), (20, 7)], [(8, 3)], [(9, 4), (12, 2)]]
    # Two agents: agent 0 runs session 0 (calls at 0 and 5 + 1), agent 1 runs session 1 (at 1), then,
    # being free first (at 1 + 3 + 1 = 5), session 2 (at 5 and 5 + 4 + 1).
    assert bench.arrival_times(sessions, agents=2, tool_tokens=1) == [
        (0.0, 0, 0), (1.0, 1, 0), (5.0, 2, 0), (6.0, 0, 1), (10.0, 2, 1)]
    stream = bench.build_stream(sessions, requests=4, agents=2, tool_tokens=1, window=3.0, prompt_scale=0.5,
                                max_prompt=8, output_scale=1.0, max_new=6)
    assert [a.at for a in stream] == [0.0, 0.5, 2.5, 3.0]  # rescaled to end at the window
    assert [(a.prompt_len, a.output_len) for a in stream] == [(5, 5), (4, 3), (4, 4), (8, 6)]


def test_serve_bench_runs_every_mode_with_equal_outputs(tmp_path):
    out = tmp_path / "serving.json"
    report = bench.main(["--requests", "3", "--windows", "0", "--max-new-tokens", "8", "--max-prompt", "24",
                         "--slots", "4", "--max-tree", "4", "--prefill-budget", "32", "--rehearsals", "0",
                         "--traces", "", "--http", "--note", "smoke test", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["pattern_source"].endswith("serving_pattern.json")
    assert report["args"]["note"] == "smoke test" and len(report["machine"]["loadavg_1_5_15"]) == 3
    assert [r["mode"] for r in report["rows"]] == list(bench.MODES) + [bench.HTTP_MODE]
    for row in report["rows"]:
        assert row["outputs_equal"] and row["complete"], row["mode"]
        assert row["tokens"] == report["stream"]["output_tokens"]
        assert row["tokens_per_s"] > 0 and 0 <= row["latency_p50_s"] <= row["latency_p99_s"]
    by_mode = {r["mode"]: r for r in report["rows"]}
    assert by_mode["continuous-plain"]["tokens_per_pass"] == by_mode["static-plain"]["tokens_per_pass"] == 1.0
    assert set(report["continuous_over_static_by_window"]["0"]) == {"suffix", "plain", "best"}
