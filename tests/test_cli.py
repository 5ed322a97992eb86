"""The ``specjax`` command line on the embedded model: JSON output, baseline comparison, errors."""

import json

import pytest

from specjax.engine.cli import main

embedded = pytest.importorskip("specjax.models.embedded")


def _run_json(capsys, *args):
    assert main(["generate", "--json", "--max-new-tokens", "24", "--num-demo-prompts", "3", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_json_with_baseline_is_identical_and_counts_passes(capsys):
    out = _run_json(capsys, "--drafter", "prompt-lookup", "--compare-baseline")
    assert out["identical_to_baseline"] is True
    assert len(out["text"]) == 3 and len(out["token_ids"]) == 3
    assert out["tokens"] == sum(len(t) for t in out["token_ids"])
    assert out["baseline"]["target_passes"] == out["baseline"]["tokens"]  # one token per plain pass
    assert out["target_passes"] <= out["baseline"]["target_passes"]
    assert out["tokens_per_pass"] == pytest.approx(out["tokens"] / out["target_passes"])


def test_no_spec_is_plain_decoding(capsys):
    out = _run_json(capsys, "--no-spec", "--prompt", "-- question: How many rows?\nSELECT")
    assert out["drafter"] == "none" and out["tokens_per_pass"] == 1.0


def test_missing_model_directory_is_a_clear_error():
    from specjax.models.safetensors_io import CheckpointError

    with pytest.raises(CheckpointError, match="does not exist"):
        main(["generate", "--model", "/nonexistent/model", "--prompt", "x"])
