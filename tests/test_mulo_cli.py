"""``specjax generate-image``: MuLo-SD drafting with exact acceptance draws the very images plain
decoding draws (the same seed); pooled acceptance is opt-in and labelled LOSSY on stderr, in the
JSON and in the PNG."""

import json

import numpy as np
from PIL import Image

from specjax.engine.cli import main


def run(capsys, tmp_path, name, *flags):
    out = tmp_path / f"{name}.png"
    assert main(["generate-image", "--classes", "3,7", "--json", "--out", str(out), *flags]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out), np.asarray(Image.open(out)), captured.err


def test_mulo_cli_exact_equals_plain_and_pooled_is_labelled_lossy(capsys, tmp_path):
    plain, plain_png, _ = run(capsys, tmp_path, "plain", "--drafter", "none")
    exact, exact_png, exact_err = run(capsys, tmp_path, "exact")
    assert exact["acceptance"] == "exact" and exact["lossy"] is False and "LOSSY" not in exact_err
    assert np.array_equal(exact_png[16:], plain_png[16:])  # below the title strip: the same images
    assert sum(exact["target_passes"]) < sum(plain["target_passes"]) == 2 * 256  # a pass per token
    pooled, pooled_png, pooled_err = run(capsys, tmp_path, "pooled", "--acceptance", "pooled")
    assert pooled["lossy"] is True and "LOSSY" in pooled_err
    assert not np.array_equal(pooled_png[:16], exact_png[:16])  # the title says so
    assert sum(pooled["target_passes"]) < sum(exact["target_passes"])


def test_mulo_cli_refuses_bad_classes_and_pooled_without_mulo(tmp_path):
    import pytest

    with pytest.raises(SystemExit, match="digits in"):
        main(["generate-image", "--classes", "3,12", "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit, match="needs --drafter mulo"):
        main(["generate-image", "--drafter", "none", "--acceptance", "pooled", "--out", str(tmp_path / "x.png")])
