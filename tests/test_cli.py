"""The ``specjax`` command line on the embedded model: JSON output, baseline comparison, errors."""

import json

import pytest

from specjax.engine.cli import main

embedded = pytest.importorskip("specjax.models.embedded")


def _run_json(capsys, *args):
    assert main(["generate", "--model", "tiny-sql", "--json", "--max-new-tokens", "24", "--num-demo-prompts", "3",
                 *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_json_with_baseline_is_identical_and_counts_passes(capsys):
    out = _run_json(capsys, "--drafter", "prompt-lookup", "--compare-baseline")
    assert out["identical_to_baseline"] is True
    assert len(out["text"]) == 3 and len(out["token_ids"]) == 3
    assert out["tokens"] == sum(len(t) for t in out["token_ids"])
    assert out["baseline"]["target_passes"] == out["baseline"]["tokens"]  # one token per plain pass
    assert out["target_passes"] <= out["baseline"]["target_passes"]
    assert out["tokens_per_pass"] == pytest.approx(out["tokens"] / out["target_passes"])
    # Three interleaved timed runs per side (the default --repeat); the reported walls are their medians.
    for side in (out, out["baseline"]):
        assert len(side["wall_s_runs"]) == 3
        assert side["wall_s"] == sorted(side["wall_s_runs"])[1]
    assert out["speedup"] == pytest.approx(out["baseline"]["wall_s"] / out["wall_s"])


def test_repeat_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--repeat", "0"])
    assert "expected a positive integer" in capsys.readouterr().err


def test_no_spec_is_plain_decoding(capsys):
    out = _run_json(capsys, "--no-spec", "--prompt", "-- question: How many rows?\nSELECT")
    assert out["drafter"] == "none" and out["tokens_per_pass"] == 1.0


def test_missing_model_directory_is_a_clear_error():
    from specjax.models.safetensors_io import CheckpointError

    with pytest.raises(CheckpointError, match="does not exist"):
        main(["generate", "--model", "/nonexistent/model", "--prompt", "x"])


def test_stop_string_cuts_the_text_before_it():
    import jax.numpy as jnp

    from specjax.engine.engine import Engine
    from specjax.models.loading import load_model
    from specjax.models.embedded.toy_corpus import sql_prompts

    model = load_model(embedded.default_model_dir(), dtype=jnp.float32)
    engine = Engine(model, None)
    prompt = sql_prompts(1, seed=3)[0]
    full = engine.generate([prompt], max_new_tokens=24)[0]
    assert " FROM" in full.text
    cut = engine.generate([prompt], max_new_tokens=24, stop=[" FROM"])[0]
    assert cut.text == full.text[: full.text.index(" FROM")]
    # The ids run through the token that completed the stop string (as vLLM reports them).
    assert " FROM" in engine.decode(cut.token_ids) and " FROM" not in engine.decode(cut.token_ids[:-1])


def test_sampled_baseline_comparison_says_what_is_compared(capsys):
    out = _run_json(capsys, "--compare-baseline", "--temperature", "1")
    assert out["sampled"] is True
    from specjax.engine.cli import _comparison

    message = _comparison(out)
    assert "DIFFERENT" not in message and "same distribution" in message
