"""Training plumbing (models/training.py) and drafter training (drafters/training.py)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from specjax.models.training import (TrainCheckpointer, TrainState, make_optimizer, plot_curves,
                                     save_safetensors)

# ------------------------------------------------------------------ models/training.py: exact resume


def _toy_batch(position: int):
    """Data depends on the position in the stream: a resume that loses it sees other data."""
    rng = np.random.default_rng(position)
    x = rng.normal(size=(8, 4)).astype(np.float32)
    return x, (x @ np.arange(1, 5, dtype=np.float32))[:, None] + 0.1 * rng.normal(size=(8, 1)).astype(np.float32)


def _toy_setup():
    params = {"w": jnp.zeros((4, 1)), "b": jnp.zeros((1,))}
    optimizer = make_optimizer(0.1, total_steps=6, warmup_steps=2, weight_decay=0.01)

    @jax.jit
    def step(params, opt_state, key, x, y):
        key, sub = jax.random.split(key)
        noise = 0.01 * jax.random.normal(sub, x.shape)  # the step consumes the key too

        def loss(p):
            return jnp.mean(((x + noise) @ p["w"] + p["b"] - y) ** 2)

        grads = jax.grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, key

    return TrainState(params, optimizer.init(params), 0, 0, jax.random.key(0)), step


def _train(state: TrainState, step_fn, n: int) -> TrainState:
    for _ in range(n):
        x, y = _toy_batch(state.data_position)
        params, opt_state, key = step_fn(state.params, state.opt_state, state.rng, x, y)
        state = TrainState(params, opt_state, state.step + 1, state.data_position + 1, key)
    return state


def test_resume_is_bitwise_exact_and_negative_controls_differ(tmp_path):
    fresh, step_fn = _toy_setup()
    straight = _train(fresh, step_fn, 6)

    ckpt = TrainCheckpointer(str(tmp_path / "ckpt"), save_every=3, keep=2)
    assert ckpt.restore_latest(fresh) is None
    first = _train(fresh, step_fn, 3)
    assert ckpt.save(first)
    ckpt.close()

    template, step_fn2 = _toy_setup()  # as a new process would: fresh state, fresh jit
    restored = TrainCheckpointer(str(tmp_path / "ckpt"), save_every=3, keep=2).restore_latest(template)
    assert (restored.step, restored.data_position) == (3, 3)
    resumed = _train(restored, step_fn2, 3)
    for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
        assert np.array_equal(np.asarray(a), np.asarray(b))

    no_opt = _train(dataclasses.replace(restored, opt_state=template.opt_state), step_fn2, 3)
    no_data = _train(dataclasses.replace(restored, data_position=0), step_fn2, 3)
    no_key = _train(dataclasses.replace(restored, rng=template.rng), step_fn2, 3)
    for wrong in (no_opt, no_data, no_key):
        assert not np.array_equal(np.asarray(wrong.params["w"]), np.asarray(straight.params["w"]))


def test_checkpointer_keeps_the_newest(tmp_path):
    fresh, step_fn = _toy_setup()
    ckpt = TrainCheckpointer(str(tmp_path / "c"), save_every=2, keep=2)
    state = fresh
    saved = []
    for _ in range(6):
        state = _train(state, step_fn, 1)
        saved.append(ckpt.save(state))
    assert saved == [False, True, False, True, False, True]
    assert ckpt.latest_step() == 6
    assert sorted(ckpt._manager.all_steps()) == [4, 6]
    ckpt.close()


def test_optimizer_schedule_and_errors():
    opt = make_optimizer(1.0, total_steps=10, warmup_steps=2, weight_decay=0.0, clip=1e9)
    params = {"w": jnp.zeros(())}
    state = opt.init(params)
    ups = []
    for _ in range(3):
        u, state = opt.update({"w": jnp.ones(())}, state, params)
        ups.append(float(u["w"]))
    assert ups[0] == 0.0 and abs(ups[1]) < abs(ups[2])  # warmup from 0
    with pytest.raises(ValueError, match="warmup_steps"):
        make_optimizer(1.0, total_steps=5, warmup_steps=6)


def test_save_safetensors_and_plot(tmp_path):
    from specjax.models.safetensors_io import SafetensorsFile

    path = str(tmp_path / "w.safetensors")
    save_safetensors(path, {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([3], np.int32)})
    f = SafetensorsFile(path)
    assert np.array_equal(f.tensor("a"), np.arange(6, dtype=np.float32).reshape(2, 3))
    with pytest.raises(TypeError, match="numpy"):
        save_safetensors(path, {"a": [1, 2]})
    pytest.importorskip("matplotlib")
    png = str(tmp_path / "curves.png")
    assert plot_curves(png, {"step": [1, 2, 3], "loss": [3.0, 2.0, 1.0], "accept": [0.1, 0.2, 0.4]})
    with open(png, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
