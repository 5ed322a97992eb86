"""``from specjax import Engine, load_model, load_drafter, SpecConfig``: the public API, what the CLI uses."""

import subprocess
import sys

import jax.numpy as jnp
import pytest


def test_import_specjax_stays_cheap():
    """The public names load on first use: ``import specjax`` does not pull in the engine or the models."""
    code = ("import sys, specjax; "
            "print(sorted(m for m in sys.modules if m.startswith(('specjax.engine.engine', 'specjax.models', "
            "'specjax.drafters'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_public_names_are_the_library_objects():
    import specjax
    from specjax.drafters.factory import load_drafter
    from specjax.engine.engine import Engine
    from specjax.engine.spec_config import SpecConfig
    from specjax.models.loading import load_model

    assert (specjax.Engine, specjax.load_model, specjax.load_drafter, specjax.SpecConfig) == (
        Engine, load_model, load_drafter, SpecConfig)
    assert {"Engine", "load_model", "load_drafter", "SpecConfig", "enable_compilation_cache"} <= set(dir(specjax))
    with pytest.raises(AttributeError, match="no attribute 'Engin'"):
        specjax.Engin  # noqa: B018


def test_python_users_get_what_the_cli_gets():
    """``load_drafter("auto", embedded model)`` on a CPU is the CLI's choice: the suffix index, pre-filled
    with the shipped history, and lossless."""
    from specjax import Engine, load_drafter, load_model
    from specjax.drafters.suffix_index import SuffixDecodingDrafter
    from specjax.engine.plain import greedy_generate
    from specjax.models.embedded import default_model_dir, embedded_suffix_history
    from specjax.models.embedded.toy_corpus import sql_prompts

    model = load_model(default_model_dir(), dtype=jnp.float32)
    drafter = load_drafter("auto", model)
    assert isinstance(drafter, SuffixDecodingDrafter)
    empty = load_drafter("suffix", model, suffix_history="none")
    if embedded_suffix_history() is not None:  # the shipped history pre-fills the global index
        assert len(drafter.history) > len(empty.history) == 0
    assert load_drafter("none", model) is None
    prompts = sql_prompts(3, seed=1)
    engine = Engine(model, drafter, max_batch_size=4)
    results = engine.generate(prompts, max_new_tokens=24)
    assert [r.token_ids for r in results] == greedy_generate(model, [engine.encode(p) for p in prompts], 24)
