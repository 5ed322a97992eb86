"""The real-model benchmark's pure parts: task selection, tree-shape parsing, the Markdown table,
and that its EAGLE-3 training requests never repeat a measured task (no real model is loaded); and
its HierSpec runner on tiny random models."""

import argparse

import pytest

from engine_helpers import load_benchmark, near_copy, tiny_model


bench = load_benchmark("bench_real_models")
requests = load_benchmark("real_model_train_requests")


def test_code_categories_select_only_code_and_sql_tasks():
    tasks = bench.select_tasks("code", None)
    assert tasks and {t["category"] for t in tasks} <= set(bench.CODE_CATEGORIES)
    assert len(bench.select_tasks("code", 2)) == 2
    every = bench.select_tasks(None, None)
    assert len(every) > len(tasks)


def test_unknown_category_is_refused_by_name():
    with pytest.raises(SystemExit, match="poetry"):
        bench.select_tasks("poetry", None)


@pytest.mark.parametrize("text,shape", [("16x4x6", (16, 4, 6)), ("8X1x8", (8, 1, 8))])
def test_tree_shapes_parse(text, shape):
    assert bench.parse_shape(text) == shape


@pytest.mark.parametrize("text", ["16x4", "4x8x2", "8x2x9", "ax2x2", "0x1x1"])
def test_bad_tree_shapes_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        bench.parse_shape(text)


def test_markdown_table_marks_a_lossy_run():
    run = dict(tokens_per_pass=2.5, mean_accepted=1.5, speedup=1.2, lossless=False)
    report = {"measurements": [{"target": "t", "batch": 1, "tasks": ["a"], "runs": {"plain": dict(run, lossless=True), "x": run}}]}
    lines = bench.markdown_table(report).splitlines()
    assert len(lines) == 3  # plain's own row is left out: each speedup is against it
    assert lines[2].endswith("| NO |") and "| 1 | x | 2.50 | 1.50 | 1.20x |" in lines[2]


def test_training_requests_are_distinct_and_disjoint_from_the_tasks():
    from specjax.models.tasks import load_tasks

    made = requests.training_requests(96, seed=0)
    assert len({repr(c) for c in made}) == 96
    task_texts = {m["content"] for t in load_tasks() for m in t["messages"]}
    assert not {m["content"] for c in made for m in c} & task_texts


def test_training_requests_refuse_a_request_that_repeats_a_task():
    made = requests.training_requests(5, seed=1)
    fake_task = {"messages": [made[2][-1]]}  # a "task" equal to one of the requests
    with pytest.raises(ValueError, match="repeats a benchmark task"):
        requests.training_requests(5, seed=1, tasks=[fake_task])


def test_hierarchical_runner_verifies_the_intermediates_chains_losslessly():
    target = tiny_model(vocab=61)
    intermediate = near_copy(target, 0.02, seed=3)
    args = bench.build_parser().parse_args(["--drafters", "hierarchical", "--min-lengths", "3", "--hier-top", "4"])
    runners = bench.make_runners(target, intermediate, None, args, batch=2)
    assert [r.name for r in runners] == ["plain", "hierarchical(tr4->draft,min3)"]
    prompts = [[1, 2, 3, 4, 5], [6, 7, 8]]
    plain = [r.token_ids for r in runners[0].engine.generate(prompts, 16)]
    runners[1].prepare([])
    out = runners[1].engine.generate(prompts, 16)
    assert [r.token_ids for r in out] == plain
    assert sum(len(r.token_ids) for r in out) / sum(r.target_passes for r in out) > 2.0  # long chains accepted
