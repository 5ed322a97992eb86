"""The draft model shipped for the embedded model: lossless, really trained, and what the CLI picks."""

import argparse

import jax.numpy as jnp
import pytest

from specjax.drafters.draft_model import DraftModelDrafter
from specjax.engine.cli import make_drafter, resolve_drafter
from specjax.engine.engine import Engine
from specjax.engine.plain import greedy_generate
from specjax.models.embedded import default_model_dir, embedded_drafter_dir
from specjax.models.loading import load_model
from specjax.models.toy_corpus import sql_prompts


def _args(**overrides):
    args = dict(model=None, drafter="auto", drafter_model=None, draft_capacity="auto", max_draft_capacity=16,
                tree_topk=None, tree_depth=None)
    args.update(overrides)
    return argparse.Namespace(**args)


@pytest.fixture(scope="module")
def target():
    return load_model(default_model_dir(), dtype=jnp.float32)


def test_shipped_drafter_is_lossless_and_trained(target):
    assert embedded_drafter_dir() is not None
    drafter = make_drafter("draft-model", target, _args(drafter_model=embedded_drafter_dir()))
    assert isinstance(drafter, DraftModelDrafter)
    assert (drafter.capacity, drafter.topk, drafter.depth) == (4, 1, 4)  # its specjax_drafter.json
    prompts = sql_prompts(6, seed=0)
    engine = Engine(target, drafter, max_batch_size=8)
    results = engine.generate(prompts, max_new_tokens=48)
    assert [r.token_ids for r in results] == greedy_generate(target, [engine.encode(p) for p in prompts], 48)
    passes = sum(r.target_passes for r in results)
    tokens = sum(len(r.token_ids) for r in results)
    assert tokens / passes > 2.0  # an untrained draft model stays near 1.0


def test_cli_picks_the_shipped_drafter_where_it_applies():
    args = _args(drafter="draft-model")
    resolve_drafter(args)
    assert args.drafter_model == embedded_drafter_dir()
    args = _args()
    resolve_drafter(args)
    assert args.drafter == "suffix"  # on a CPU a verified chain costs its length in steps (README)
    args = _args(model="/some/other/model", drafter="draft-model")
    resolve_drafter(args)
    assert args.drafter_model is None  # the shipped drafter belongs to the embedded model only
    args = _args(drafter="draft-model", drafter_model=embedded_drafter_dir(), draft_capacity=6, tree_topk=2)
    target_stub = load_model(default_model_dir(), dtype=jnp.float32)
    drafter = make_drafter("draft-model", target_stub, args)
    assert (drafter.capacity, drafter.topk, drafter.depth) == (6, 2, 4)  # flags override the file
