"""The draft model shipped for the embedded model: lossless, really trained, and what the CLI picks."""

import jax.numpy as jnp
import pytest

from specjax.drafters.draft_model import DraftModelDrafter
from specjax.drafters.factory import load_drafter, resolve_drafter_name
from specjax.engine.engine import Engine
from specjax.engine.plain import greedy_generate
from specjax.models.embedded import default_model_dir, embedded_drafter_dir
from specjax.models.loading import load_model
from specjax.models.embedded.toy_corpus import sql_prompts


@pytest.fixture(scope="module")
def target():
    return load_model(default_model_dir(), dtype=jnp.float32)


def test_shipped_drafter_is_lossless_and_trained(target):
    assert embedded_drafter_dir() is not None
    drafter = load_drafter("draft-model", target, drafter_model=embedded_drafter_dir())
    assert isinstance(drafter, DraftModelDrafter)
    assert (drafter.capacity, drafter.topk, drafter.depth) == (4, 1, 4)  # its specjax_drafter.json
    prompts = sql_prompts(6, seed=0)
    # Its own chain of 4 every step: the auto tree size speculates little on a CPU, where chains cost.
    engine = Engine(target, drafter, max_batch_size=8, draft_capacity=drafter.capacity)
    results = engine.generate(prompts, max_new_tokens=48)
    assert [r.token_ids for r in results] == greedy_generate(target, [engine.encode(p) for p in prompts], 48)
    passes = sum(r.target_passes for r in results)
    tokens = sum(len(r.token_ids) for r in results)
    assert tokens / passes > 2.0  # an untrained draft model stays near 1.0


def test_auto_picks_the_shipped_drafter_where_it_applies(target):
    assert resolve_drafter_name("draft-model", model_is_embedded=True) == ("draft-model", embedded_drafter_dir())
    # On a CPU a verified chain costs its length in steps (README): the suffix index.
    assert resolve_drafter_name("auto", model_is_embedded=True) == ("suffix", None)
    assert resolve_drafter_name("auto", model_is_embedded=False) == ("prompt-lookup", None)
    # The shipped drafter belongs to the embedded model only.
    assert resolve_drafter_name("draft-model", model_is_embedded=False) == ("draft-model", None)
    drafter = load_drafter("draft-model", target, draft_capacity=6, tree_topk=2)  # shipped weights by default
    assert (drafter.capacity, drafter.topk, drafter.depth) == (6, 2, 4)  # arguments override the file
    with pytest.raises(ValueError, match="unknown drafter 'eagle'"):
        resolve_drafter_name("eagle", model_is_embedded=True)


def test_every_model_drafter_defaults_to_the_shipped_weights():
    from specjax.models.embedded import embedded_eagle3_dir

    eagle3, draft = embedded_eagle3_dir(), embedded_drafter_dir()
    assert eagle3 is not None and draft is not None
    want = {"draft-model": draft, "eagle3": eagle3, "graft": eagle3, "taps": f"{eagle3},{draft}"}
    for name, path in want.items():
        assert resolve_drafter_name(name, model_is_embedded=True) == (name, path)
        # the shipped drafters belong to the embedded model only
        assert resolve_drafter_name(name, model_is_embedded=False) == (name, None)
        assert resolve_drafter_name(name, "/my/drafter", model_is_embedded=True) == (name, "/my/drafter")


def test_cli_resolves_the_drafter_flags_through_the_library():
    import argparse

    from specjax.engine.cli import resolve_drafter_args

    for model in (None, default_model_dir()):
        args = argparse.Namespace(model=model, drafter="eagle3", drafter_model=None)
        resolve_drafter_args(args)
        assert (args.drafter, args.drafter_model) == resolve_drafter_name("eagle3", model_is_embedded=True)
    args = argparse.Namespace(model="/some/other/model", drafter="auto", drafter_model=None)
    resolve_drafter_args(args)
    assert (args.drafter, args.drafter_model) == ("prompt-lookup", None)


@pytest.mark.parametrize("drafter", ["eagle3", "graft"])
def test_shipped_model_drafters_run_with_no_other_flag_and_are_lossless(drafter, capsys):
    import json

    from specjax.engine.cli import main

    assert main(["generate", "--model", default_model_dir(), "--drafter", drafter, "--compare-baseline",
                 "--num-demo-prompts", "3", "--max-new-tokens", "16", "--repeat", "1", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["drafter"] == drafter
    assert summary["identical_to_baseline"] is True
    assert summary["tokens"] == summary["baseline"]["tokens"] > 3
