"""The hot path's costs, checked on compiled programs: in-place KV, lean prefill, stable compiles."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine_helpers import tiny_model
from specjax.drafters.prompt_lookup import PromptLookupDrafter
from specjax.engine import steps
from specjax.engine.engine import Engine
from specjax.engine.plain import greedy_generate
from specjax.engine.sampling import SamplingParams
from specjax.engine.state import DecodeState
from specjax.engine.tree import empty_tree

B, S, T = 2, 2048, 4
MODEL = tiny_model(0, layers=3)
CFG = MODEL.config


def _state(batch=B, max_len=S, length=10):
    return DecodeState(cache=steps.new_cache(CFG, batch, max_len, jnp.float32),
                       lengths=jnp.full(batch, length, jnp.int32), last_tokens=jnp.zeros(batch, jnp.int32),
                       remaining=jnp.full(batch, 50, jnp.int32), finished=jnp.zeros(batch, bool),
                       rng=jax.random.key(0), sampling=SamplingParams.make(batch))


def _ops_with_shape(hlo: str, dims: tuple[int, ...]) -> list[str]:
    """Instructions (not parameters / tuple plumbing) whose result has exactly these dims."""
    shape = r"f32\[" + ",".join(map(str, dims)) + r"\]"
    plumbing = ("parameter(", "get-tuple-element(", " tuple(", " while(", "bitcast(")
    ops = []
    for line in hlo.splitlines():
        line = line.strip()
        if re.match(rf"^(ROOT )?%[\w.\-]+ = {shape}", line) and not any(p in line for p in plumbing):
            ops.append(line)
    return ops


def test_step_never_copies_or_rewrites_a_whole_layer_of_the_cache():
    hlo = steps.step.lower(MODEL.params, _state(), jax.device_put(empty_tree(B, T)), cfg=CFG).compile().as_text()
    layer = (B, CFG.num_kv_heads, S, CFG.head_dim)
    stacked = (CFG.num_layers,) + layer
    assert _ops_with_shape(hlo, layer) == []  # no layer sliced out, copied or rebuilt
    whole = _ops_with_shape(hlo, stacked)
    # The only ops producing the whole cache are the scatters of the new / compacted rows ...
    assert whole and all("scatter" in op for op in whole), whole
    # ... and they update the donated input buffers in place.
    assert hlo.splitlines()[0].count("may-alias") >= 2


def test_prefill_applies_the_lm_head_to_the_last_positions_only():
    model = tiny_model(0, vocab=97)  # a vocab size no other dimension shares
    cfg, width = model.config, 64
    chunk = steps.prefill_chunk.lower(model.params, steps.new_cache(cfg, B, 256, jnp.float32),
                                      jnp.zeros((B, width), jnp.int32), jnp.zeros(B, jnp.int32),
                                      jnp.full(B, 40, jnp.int32), jnp.zeros((B, cfg.hidden_size)),
                                      cfg=cfg).compile().as_text()
    assert f",{cfg.vocab_size}]" not in chunk  # no logits at all while the prompt streams through
    head = steps._first_tokens.lower(model.params, cfg, steps.new_cache(cfg, B, 256, jnp.float32),
                                     jnp.zeros((B, cfg.hidden_size)), jnp.full(B, 40, jnp.int32),
                                     jnp.full(B, 8, jnp.int32), jax.random.key(0),
                                     SamplingParams.make(B)).compile().as_text()
    logits_shapes = set(re.findall(rf"f32\[[\d,]*{cfg.vocab_size}\]", head))
    assert logits_shapes == {f"f32[{B},{cfg.vocab_size}]"}


def test_chunked_prefill_matches_one_pass_prefill():
    prompts = [list(np.random.default_rng(0).integers(0, 64, 70)), [5, 6, 7]]
    one_pass = Engine(MODEL, None, prefill_chunk=128).generate(prompts, max_new_tokens=6)
    chunked = Engine(MODEL, None, prefill_chunk=16).generate(prompts, max_new_tokens=6)
    assert [r.token_ids for r in chunked] == [r.token_ids for r in one_pass]
    assert [r.token_ids for r in one_pass] == greedy_generate(MODEL, prompts, 6)


def _compile_counts():
    return {f.__name__: f._cache_size() for f in (steps.step, steps.prefill_chunk, steps._first_tokens)}


def test_compiles_are_bounded_by_the_buckets_used():
    model = tiny_model(3, layers=1)
    model = dataclasses.replace(model, config=dataclasses.replace(model.config, max_position_embeddings=2048))
    engine = Engine(model, PromptLookupDrafter(), draft_capacity=4, attention="xla", prefill_chunk=256)
    rng = np.random.default_rng(0)
    calls = [(5, 1, 0.0), (17, 3, 0.7), (40, 16, 1.0), (120, 5, 0.0), (300, 2, 0.7),
             (900, 1, 1.0), (9, 9, 0.0), (250, 12, 0.7), (33, 16, 1.0), (600, 4, 0.0)]
    before = _compile_counts()
    steps_used, chunks_used, heads_used = set(), set(), set()
    for prompt_len, batch, temperature in calls:
        prompts = [list(rng.integers(0, 64, prompt_len - i % 3)) for i in range(batch)]
        engine.generate(prompts, max_new_tokens=3, temperature=temperature, seed=prompt_len)
        rows, width = engine.batch_bucket(batch), engine.prompt_bucket(prompt_len)
        max_len = engine.cache_bucket(prompt_len, 3)  # the longest real prompt's bucket
        steps_used.add((rows, max_len))
        chunks_used.add((rows, min(width, engine.prefill_chunk), max_len))
        heads_used.add((rows, max_len))
    after = _compile_counts()
    grown = {k: after[k] - before[k] for k in after}
    assert grown["step"] <= len(steps_used)
    assert grown["prefill_chunk"] <= len(chunks_used)
    assert grown["_first_tokens"] <= len(heads_used)
    assert len(steps_used) < len(calls)  # buckets are shared, so the bound is not trivial

    # Negative control: only the sampling settings change -> nothing recompiles.
    prompts = [list(rng.integers(0, 64, 20)) for _ in range(3)]
    engine.generate(prompts, max_new_tokens=3, temperature=0.0)
    settled = _compile_counts()
    for temperature, top_k, top_p in [(0.7, 0, 1.0), (1.0, 5, 0.9), ([0.0, 1.3, 0.5], [0, 3, 0], [1.0, 1.0, 0.8])]:
        engine.generate(prompts, max_new_tokens=3, temperature=temperature, top_k=top_k, top_p=top_p)
    assert _compile_counts() == settled


def _cache_settings() -> tuple:
    return jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs


@pytest.fixture
def restore_cache_settings():
    saved = _cache_settings()
    yield
    jax.config.update("jax_compilation_cache_dir", saved[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])


def test_engine_leaves_the_global_compilation_cache_settings_alone(monkeypatch, restore_cache_settings):
    from specjax.engine import compile_cache

    monkeypatch.delenv(compile_cache.ENV, raising=False)  # not even the default directory
    jax.config.update("jax_compilation_cache_dir", None)
    before = _cache_settings()
    Engine(MODEL, PromptLookupDrafter(), max_draft_capacity=2).generate([[1, 2, 3]], max_new_tokens=3)
    assert _cache_settings() == before


def test_enable_compilation_cache_is_explicit_and_documented(tmp_path, monkeypatch, restore_cache_settings):
    import specjax
    from specjax.engine import compile_cache

    jax.config.update("jax_compilation_cache_dir", None)
    assert specjax.enable_compilation_cache(tmp_path / "given") == tmp_path / "given"
    assert _cache_settings() == (str(tmp_path / "given"), compile_cache.MIN_COMPILE_TIME_S)
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "env"))  # the CLI's way to move it
    assert specjax.enable_compilation_cache() == tmp_path / "env"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "env")
    monkeypatch.setenv(compile_cache.ENV, "off")
    jax.config.update("jax_compilation_cache_dir", None)
    assert specjax.enable_compilation_cache() is None
    assert not jax.config.jax_compilation_cache_dir
    monkeypatch.delenv(compile_cache.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert specjax.enable_compilation_cache() == tmp_path / "xdg" / "specjax" / "jax"


def test_the_cli_turns_the_compilation_cache_on(tmp_path, monkeypatch, restore_cache_settings):
    from specjax.engine import cli, compile_cache

    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "cli"))
    monkeypatch.setattr(cli, "generate_main", lambda args: 0)
    assert cli.main(["generate", "--prompt", "x"]) == 0
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cli")


def test_warmup_reports_compile_times_and_a_cost_per_tree_size():
    engine = Engine(MODEL, PromptLookupDrafter(), max_draft_capacity=4)
    report = engine.warmup(batch_size=3, prompt_len=20, max_new_tokens=16)
    assert report["bucket"] == (4, 32, 128)
    assert set(report["step_s"]) == {0, 1, 2, 4}
    assert all(v > 0 for v in report["step_s"].values())
    assert "prefill" in report["compile_s"] and "step T=4" in report["compile_s"]


def test_prompt_longer_than_the_cache_is_a_clear_error():
    with pytest.raises(ValueError, match="max_position_embeddings"):
        Engine(MODEL, None).generate([[1] * 500], max_new_tokens=20)


def _cache_arrays(shape) -> int:
    return sum(1 for a in jax.live_arrays() if a.shape == shape)


def test_measuring_step_costs_allocates_no_second_cache(monkeypatch):
    """"auto" times each tree size's step on the batch's live state: while it measures, no more
    cache-sized buffers are alive than while the loop decodes (a scratch cache doubled them)."""
    from specjax.engine import engine as engine_module

    engine = Engine(MODEL, PromptLookupDrafter(), max_draft_capacity=4, attention="xla")
    prompts = [[5, 6, 7, 5, 6, 7, 5], [9, 8, 9, 8]]
    rows = engine.batch_bucket(len(prompts))
    shape = (CFG.num_layers, rows, CFG.num_kv_heads, engine.cache_bucket(7, 8), CFG.head_dim)
    seen = {True: [], False: []}  # cache-shaped live arrays at each step, measuring or not
    measuring = [False]
    real_step, real_measure = engine_module.step, Engine._measure_step_costs

    def counting_step(*args, **kwargs):
        seen[measuring[0]].append(_cache_arrays(shape))
        return real_step(*args, **kwargs)

    def flagged_measure(self, *args, **kwargs):
        measuring[0] = True
        try:
            return real_measure(self, *args, **kwargs)
        finally:
            measuring[0] = False

    monkeypatch.setattr(engine_module, "step", counting_step)
    monkeypatch.setattr(Engine, "_measure_step_costs", flagged_measure)
    engine.generate(prompts, max_new_tokens=8)
    assert seen[True] and seen[False]  # costs were measured, then the loop ran
    assert max(seen[True]) == max(seen[False]) >= 2  # K and V of the live cache, nothing more


def test_measuring_step_costs_leaves_the_live_state_unchanged():
    engine = Engine(MODEL, PromptLookupDrafter(), max_draft_capacity=4, attention="xla")
    prompts = [[5, 6, 7, 5, 6, 7, 5], [9, 8, 9, 8]]
    state = engine._prefill(prompts, 16, 128, 8, SamplingParams.make(2, temperature=[0.0, 0.8]),
                            seeds=np.array([3, 4])).state
    lengths = np.asarray(state.lengths)

    def snapshot(s):
        fields = jax.device_get((s.lengths, s.last_tokens, s.remaining, s.finished, jax.random.key_data(s.rng)))
        cached = [np.asarray(s.cache.k[:, b, :, : lengths[b]]) for b in range(2)]
        return fields, cached

    def same(a, b):
        return all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))

    before = snapshot(state)
    first_calls, state = engine._measure_step_costs(state)
    assert set(first_calls) == set(engine._step_costs[(2, 128)]) == {0, 1, 2, 4}
    assert same(snapshot(state), before)
    # Negative control: a plain step on the live state would have changed it.
    stepped, _ = steps.step(MODEL.params, state, empty_tree(2, 4), cfg=CFG, attention="xla")
    assert not same(snapshot(stepped), before)
