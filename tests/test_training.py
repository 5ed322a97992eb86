"""Training plumbing (models/training.py) and drafter training (drafters/training/)."""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from specjax.models.config import ModelConfig, RopeConfig
from specjax.models.decoder import init_params
from specjax.models.training import (TrainCheckpointer, TrainState, export_llama, llama_hf_config, make_optimizer,
                                     plot_curves, save_safetensors)

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


def test_export_llama_loads_back_as_the_same_model(tmp_path):
    from specjax.models.loading import load_model

    cfg = ModelConfig(model_type="llama", vocab_size=48, hidden_size=16, intermediate_size=24, num_layers=3,
                      num_heads=2, num_kv_heads=1, head_dim=8, rms_norm_eps=1e-5, tie_word_embeddings=True,
                      max_position_embeddings=64, eos_token_ids=(3,), bos_token_id=3)
    params = init_params(cfg, jax.random.key(0), jnp.float32)
    hf = llama_hf_config(cfg, tie_word_embeddings=True, bos_token_id=3, eos_token_id=3, pad_token_id=4)
    export_llama(str(tmp_path), params, hf)
    model = load_model(str(tmp_path), dtype=jnp.float32)
    assert model.config == cfg
    rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
    assert jax.tree.structure(model.params) == jax.tree.structure(rounded)
    for got, want in zip(jax.tree.leaves(model.params), jax.tree.leaves(rounded)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # layers unstacked in order
    scaled = dataclasses.replace(cfg, rope=RopeConfig(theta=5e5, kind="llama3", factor=8.0, original_max_position=32))
    assert ModelConfig.from_hf(llama_hf_config(scaled)).rope == scaled.rope


# ------------------------------------------------------------------ drafters/training/

from engine_helpers import tiny_model  # noqa: E402

from specjax.drafters.training import (TrainOptions, load_init_params, read_prompts_jsonl,  # noqa: E402
                                       train_drafter)
from specjax.drafters.training.export import init_eagle3  # noqa: E402
from specjax.drafters.training.loop import prompt_batch, target_tokens_of_step  # noqa: E402
from specjax.drafters.training.losses import (accepted_depths, opd_weights, own_chain_teacher,  # noqa: E402
                                              replay_weights, visited_roots)
from specjax.drafters.training.rollouts import (rollout_jit, ttt_alignment, unroll_head,  # noqa: E402
                                                unroll_own_chain)
from specjax.engine.sampling import SamplingParams  # noqa: E402
from specjax.drafters.eagle3 import (Eagle3Drafter, default_hidden_layers, draft_logits, fuse_features,  # noqa: E402
                                     load_eagle3)
from specjax.models.decoder import KVCache, causal_mask, forward_hidden, lm_head  # noqa: E402

K = 3  # unroll depth in these tests


@pytest.fixture(scope="module")
def target():
    return tiny_model(seed=3, vocab=64, layers=4, eos=(0,))


def _prompts(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(2, 64, size=int(rng.integers(3, 8)))) for _ in range(n)]


def _greedy_rows(target, seq_len=24):
    tokens, plen = prompt_batch(_prompts(), 0, 4, seq_len)
    tokens, valid = rollout_jit(target.params, target.config, jnp.asarray(tokens), jnp.asarray(plen),
                                   jax.random.key(0), temperature=0.0)
    return np.asarray(tokens), np.asarray(valid), plen


@functools.partial(jax.jit, static_argnames=("cfg", "hidden_layers"))
def _forward(params, tokens, valid, *, cfg, hidden_layers):
    b, s = tokens.shape
    x, _, hidden = forward_hidden(params, cfg, tokens, jnp.broadcast_to(jnp.arange(s), (b, s)),
                                  KVCache.zeros(cfg, b, s), jnp.zeros(b, jnp.int32), causal_mask(b, s, valid),
                                  hidden_layers=hidden_layers)
    return lm_head(params, cfg, x), hidden


def _target_outputs(target, tokens, valid, hidden_layers=()):
    logits, hidden = _forward(target.params, jnp.asarray(tokens), jnp.asarray(valid), cfg=target.config,
                              hidden_layers=tuple(hidden_layers))
    return np.asarray(logits), hidden


def test_ttt_alignment_hand_checked():
    pos, valid = ttt_alignment(jnp.asarray([5]), 6, 3)
    assert np.asarray(pos[:, 0]).tolist() == [[1, 2, 3, 4, 5, 6], [2, 3, 4, 5, 6, 7], [3, 4, 5, 6, 7, 8]]
    assert np.asarray(valid[:, 0]).astype(int).tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0],
                                                           [1, 1, 0, 0, 0, 0]]


def test_ttt_teacher_verifies_the_drafted_token(target):
    """On a greedy target trajectory, the teacher of step i at chain j (the logits that verify the
    draft of token j + 2 + i) has argmax token j + 2 + i (for generated tokens); off-by-one
    alignments do not."""
    tokens, valid, plen = _greedy_rows(target)
    teacher, _ = _target_outputs(target, tokens, valid)
    s = tokens.shape[1]

    def agrees(pos_of):
        pos, ok = ttt_alignment(jnp.asarray(valid), s, K)
        pos, ok = np.asarray(pos_of(pos)), np.asarray(ok)
        checked = 0
        for i in range(K):
            for b in range(tokens.shape[0]):
                for j in range(s):
                    nxt = j + 2 + i
                    if ok[i, b, j] and plen[b] <= nxt < valid[b] and 0 <= pos[i, b, j] < s:
                        checked += 1
                        if teacher[b, pos[i, b, j]].argmax() != tokens[b, nxt]:
                            return False
        return checked > 10

    assert agrees(lambda p: p)
    assert not agrees(lambda p: p - 1)  # the token's own position (EAGLE-1 style feature alignment)
    assert not agrees(lambda p: p + 1)


def _head_for(target, seed=0):
    layers = default_hidden_layers(target.config.num_layers)
    cfg, params, frozen = init_eagle3(target, layers, jax.random.key(seed))
    params = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(seed + 1), x.shape), params)
    return cfg, {**params, **frozen}, layers


def test_unroll_equals_the_drafters_own_chain(target):
    """Unrolled step i feeds the head its own step i - 1 output: on a sequence that continues the
    root with the drafter's own greedy chain, the unroll reproduces the chain's tokens and
    probabilities; feeding the target's features at steps i > 0 does not."""
    cfg, params, layers = _head_for(target)
    drafter = Eagle3Drafter(cfg, params, target.config.num_layers, capacity=K, topk=1, depth=K)
    prompt = np.asarray(_prompts()[0], np.int32)
    p = len(prompt)
    _, hidden = _target_outputs(target, prompt[None], np.asarray([p]), layers)
    root = 5
    dstate = jax.jit(drafter.prefill)(params, drafter.init_state(1, 64), jnp.asarray(prompt[None]),
                                      jnp.asarray([p]), jnp.asarray([root]), hidden)
    tree, _ = jax.jit(drafter.propose)(params, dstate, jnp.asarray([root]), jnp.asarray([p]),
                                       SamplingParams.make(1, 0.0), jax.random.key(0))
    chain = np.asarray(tree.tokens[0]).tolist()
    assert np.asarray(tree.parents[0]).tolist() == [-1, 0, 1]
    seq = np.concatenate([prompt, [root], chain]).astype(np.int32)[None]
    _, hidden = _target_outputs(target, seq, np.asarray([seq.shape[1]]), layers)
    fused = fuse_features(params, hidden)

    def chain_of(outs):
        probs = jax.nn.softmax(draft_logits(cfg, params, outs[:, 0, p - 1]), axis=-1)
        return np.asarray(jnp.argmax(probs, -1)).tolist(), np.cumprod(np.asarray(jnp.max(probs, -1)))

    unroll = jax.jit(unroll_head, static_argnums=(0, 4))
    toks, cum = chain_of(unroll(cfg, params, fused, jnp.asarray(seq), K))
    assert toks == chain
    np.testing.assert_allclose(cum, np.asarray(tree.draft_probs[0]), rtol=1e-4)

    def teacher_fed(fused, tokens):  # EAGLE-1 style: step i at chain j gets the target's features of j + i
        outs = []
        for i in range(K):
            f = jnp.roll(fused, -i, axis=1)
            outs.append(unroll(cfg, params, f, jnp.roll(tokens, -i, axis=1), 1)[0])
        return jnp.stack(outs)

    wrong_toks, wrong_cum = chain_of(teacher_fed(fused, jnp.asarray(seq)))
    assert wrong_toks != chain or not np.allclose(wrong_cum, np.asarray(tree.draft_probs[0]), rtol=1e-4)

    # unroll_own_chain feeds the head its own proposals too: on a row that does not continue with
    # the chain, chain p - 1 still proposes the drafter's chain, with the outputs of the
    # teacher-forced unroll on the row that does; the teacher-forced unroll of that other row
    # computes other states (negative control).
    own_outs, _ = jax.jit(unroll_own_chain, static_argnums=(0, 4))(cfg, params, fused, jnp.asarray(seq), K)
    other = np.concatenate([prompt, [root], [(t + 7) % 60 + 2 for t in chain]]).astype(np.int32)[None]
    _, hidden = _target_outputs(target, other, np.asarray([other.shape[1]]), layers)
    fused_other = fuse_features(params, hidden)
    own_other, drafts = jax.jit(unroll_own_chain, static_argnums=(0, 4))(cfg, params, fused_other,
                                                                            jnp.asarray(other), K)
    assert np.asarray(drafts[:, 0, p - 1]).tolist() == chain
    forced = np.asarray(unroll(cfg, params, fused, jnp.asarray(seq), K)[:, 0, p - 1])
    np.testing.assert_allclose(np.asarray(own_other[:, 0, p - 1]), forced, atol=1e-5)
    np.testing.assert_allclose(np.asarray(own_outs[:, 0, p - 1]), forced, atol=1e-5)
    forced_other = np.asarray(unroll(cfg, params, fused_other, jnp.asarray(other), K)[1:, 0, p - 1])
    assert not np.allclose(forced_other, forced[1:], atol=1e-3)


def test_opd_weights_hand_made():
    """Chains start at 1: chain 1 accepts 2 drafts (rejects depth 2), so the next root is 4;
    chain 4 rejects at once, next root 5; chain 5 accepts all 3 (no rejection), next root 9."""
    match = np.zeros((3, 1, 8), bool)
    for j, a in {0: 3, 1: 2, 2: 1, 3: 3, 4: 0, 5: 3, 6: 1}.items():
        match[:a, 0, j] = True
    valid = np.ones((3, 1, 8), bool)
    acc = np.asarray(accepted_depths(jnp.asarray(match), jnp.asarray(valid)))[0]
    assert acc.tolist() == [3, 2, 1, 3, 0, 3, 1, 0]
    visited = np.asarray(visited_roots(jnp.asarray(acc[None]), jnp.asarray([1])))[0]
    assert np.flatnonzero(visited).tolist() == [1, 4, 5]
    w = np.asarray(opd_weights(jnp.asarray(match), jnp.asarray(valid), jnp.asarray([1]), 1.0))[:, 0]
    expected = np.ones((3, 8))
    expected[:, 1] = [2, 2, 3]  # accepted depths 0, 1; rejected depth 2
    expected[:, 4] = [3, 1, 1]  # rejected at depth 0
    expected[:, 5] = [2, 2, 2]  # all accepted
    np.testing.assert_array_equal(w, expected)
    # Negative controls: forgetting the target's correction token (next root r + a), or counting the
    # bonus chain from the first position, visit other chains.
    wrong_next = np.asarray(jax.lax.scan(lambda n, c: (jnp.where(n == c[0], c[0] + c[1], n), n == c[0]),
                                         jnp.int32(1), (jnp.arange(8), jnp.asarray(acc)))[1])
    assert np.flatnonzero(wrong_next).tolist() != [1, 4, 5]
    wrong_start = np.asarray(visited_roots(jnp.asarray(acc[None]), jnp.asarray([0])))[0]
    assert np.flatnonzero(wrong_start).tolist() != [1, 4, 5]


def test_replay_weights_keep_the_visited_chains_past_their_rejection():
    """The hand case above (visited chains 1, 4, 5): every valid depth of a visited chain is
    replayed with weight decay ** i, below its first rejection too (the draft-induced states);
    cutting chains at the rejection, or replaying every chain, are rejected."""
    match = np.zeros((3, 1, 8), bool)
    for j, a in {0: 3, 1: 2, 2: 1, 3: 3, 4: 0, 5: 3, 6: 1}.items():
        match[:a, 0, j] = True
    valid = np.ones((3, 1, 8), bool)
    valid[1:, 0, 5] = False  # chain 5 runs off the row's end after depth 0
    w = np.asarray(replay_weights(jnp.asarray(match), jnp.asarray(valid), jnp.asarray([1]), 0.5))[:, 0]
    expected = np.zeros((3, 8))
    expected[:, 1] = expected[:, 4] = [1, 0.5, 0.25]
    expected[:, 5] = [1, 0, 0]  # now accepts 1 draft (its only valid depth): the next root is 7
    expected[:, 7] = [1, 0.5, 0.25]
    np.testing.assert_array_equal(w, expected)
    acc = np.asarray(accepted_depths(jnp.asarray(match), jnp.asarray(valid)))[0]
    cut_at_rejection = expected * (np.arange(3)[:, None] <= acc[None])
    assert not np.array_equal(w, cut_at_rejection)
    every_chain = (0.5 ** np.arange(3))[:, None] * valid[:, 0]
    assert not np.array_equal(w, every_chain)


def test_own_chain_teacher_is_the_target_on_the_drafted_text(target):
    """Entry [i, b, j] is the target's logits after row b's tokens up to j + 1 followed by chain
    j's first i drafts. Negative controls: the chain without its root token (attending one position
    short), and the target's own text in place of the drafts (teacher forcing), do not match."""
    tokens, valid, _ = _greedy_rows(target)
    rng = np.random.default_rng(0)
    drafts = rng.integers(1, 64, size=(K, *tokens.shape)).astype(np.int32)
    teacher, _ = _target_outputs(target, tokens, valid)
    fn = jax.jit(own_chain_teacher, static_argnames=("tcfg", "k"))
    got = np.asarray(fn(target.params, target.config, jnp.asarray(tokens), jnp.asarray(drafts),
                        jnp.asarray(teacher), k=K))
    assert got.shape == (K, *tokens.shape, 64)

    def last_logits(seq):  # padded to one width: one compile
        row = np.zeros((1, tokens.shape[1] + K), np.int32)
        row[0, : len(seq)] = seq
        return _target_outputs(target, row, np.asarray([len(seq)]))[0][0, len(seq) - 1]

    wrong = {"no root": 0, "teacher forced": 0}
    for b, j in [(0, 2), (1, 9), (3, 15), (2, 0)]:
        for i in range(K):
            ref = last_logits(np.concatenate([tokens[b, : j + 2], drafts[:i, b, j]]))
            np.testing.assert_allclose(got[i, b, j], ref, atol=1e-4, rtol=1e-4)
            if i:
                no_root = last_logits(np.concatenate([tokens[b, : j + 1], drafts[:i, b, j]]))
                forced = last_logits(tokens[b, : j + 2 + i])
                wrong["no root"] += not np.allclose(got[i, b, j], no_root, atol=1e-3)
                wrong["teacher forced"] += not np.allclose(got[i, b, j], forced, atol=1e-3)
    assert min(wrong.values()) >= 6, wrong


def test_target_tokens_of_a_step():
    """Generating the rows and the teacher pass each cost the rows' valid tokens; an sft pool row
    already generated costs only the teacher pass; opd adds the drafts it had verified."""
    assert target_tokens_of_step(np.asarray([5, 7]), 3, first_use=True) == 2 * 12 + 3
    assert target_tokens_of_step(np.asarray([5, 7]), 0, first_use=False) == 12


def _lossless(target, drafter):
    from specjax.engine.engine import Engine
    from specjax.engine.plain import generate_plain

    prompts = _prompts(4, seed=7)
    plain = generate_plain(target, prompts, 24, stop_at_eos=True)
    got = Engine(target, drafter, draft_capacity=drafter.capacity, max_batch_size=4).generate(prompts, 24)
    assert [r.token_ids for r in got] == plain


def test_eagle3_trains_resumes_exactly_and_loads_losslessly(target, tmp_path):
    opts = TrainOptions(batch_size=4, seq_len=24, lr=1e-2, ttt_steps=K, save_every=4, keep=3, prompt_weight=1.0)
    out = str(tmp_path / "straight")
    res = train_drafter(target, "eagle3", "opd", 12, out, prompts=_prompts(), options=opts, progress=False)
    loss = res.history["loss"]
    assert np.mean(loss[-3:]) < np.mean(loss[:3])
    assert res.plot_path is None or os.path.getsize(res.plot_path) > 0

    # Resume from step 8 in another directory: bitwise the same final params.
    import shutil

    other = str(tmp_path / "resumed")
    shutil.copytree(os.path.join(out, "checkpoints"), os.path.join(other, "checkpoints"))
    shutil.copy(os.path.join(out, "history.json"), other)
    shutil.rmtree(os.path.join(other, "checkpoints", "12"))
    again = train_drafter(target, "eagle3", "opd", 12, other, prompts=_prompts(), options=opts, resume=True,
                             progress=False)
    assert again.history["step"] == list(range(1, 13))
    assert again.history["target_tokens"] == res.history["target_tokens"]
    assert np.all(np.diff([0] + res.history["target_tokens"]) > 0)
    with pytest.raises(FileExistsError, match="resume"):
        train_drafter(target, "eagle3", "opd", 12, other, prompts=_prompts(), options=opts, progress=False)
    for a, b in zip(jax.tree.leaves(res.params), jax.tree.leaves(again.params)):
        assert np.array_equal(np.asarray(a), np.asarray(b))

    drafter = load_eagle3(out, target, dtype=jnp.float32, capacity=8, topk=2, depth=4)
    assert drafter.hidden_layers == default_hidden_layers(target.config.num_layers)
    _lossless(target, drafter)


def test_draft_model_trains_and_loads_losslessly(target, tmp_path):
    from specjax.drafters.draft_model import DraftModelDrafter
    from specjax.models.loading import load_model

    opts = TrainOptions(batch_size=4, seq_len=24, lr=1e-2, ttt_steps=K, save_every=100, prompt_weight=1.0)
    res = train_drafter(target, "draft-model", "sft", 10, str(tmp_path / "dm"), prompts=_prompts(),
                           options=opts, progress=False)
    assert np.mean(res.history["loss"][-3:]) < np.mean(res.history["loss"][:3])
    draft = load_model(str(tmp_path / "dm"), dtype=jnp.float32)
    _lossless(target, DraftModelDrafter(draft, target.config.vocab_size, capacity=4, topk=1))


def test_fine_tuning_starts_from_the_given_drafter(target, tmp_path):
    """``init_params`` (``--init DIR``) replaces the random initialization: a run started from a trained
    head begins at that head's loss, not at a fresh head's; drafters of another shape are refused."""
    opts = TrainOptions(batch_size=4, seq_len=24, lr=1e-2, ttt_steps=K, save_every=100, prompt_weight=1.0)
    trained = train_drafter(target, "eagle3", "sft", 12, str(tmp_path / "a"), prompts=_prompts(), options=opts,
                               progress=False)
    init = load_init_params("eagle3", str(tmp_path / "a"), target)
    tuned = train_drafter(target, "eagle3", "online", 1, str(tmp_path / "b"), prompts=_prompts(), options=opts,
                             progress=False, init_params=init)
    fresh_first, trained_last = trained.history["loss"][0], np.mean(trained.history["loss"][-3:])
    assert abs(tuned.history["loss"][0] - trained_last) < 0.25 * (fresh_first - trained_last)
    # Negative control: the same run without init_params starts where a fresh head does.
    cold = train_drafter(target, "eagle3", "online", 1, str(tmp_path / "c"), prompts=_prompts(), options=opts,
                            progress=False)
    assert abs(cold.history["loss"][0] - fresh_first) < 0.25 * (fresh_first - trained_last)

    small = train_drafter(target, "draft-model", "sft", 1, str(tmp_path / "d"), prompts=_prompts(),
                             options=dataclasses.replace(opts, draft_hidden=16), progress=False)
    with pytest.raises(ValueError, match="initial drafter params"):
        train_drafter(target, "eagle3", "sft", 1, str(tmp_path / "e"), prompts=_prompts(), options=opts,
                         progress=False, init_params=small.params)
    with pytest.raises(ValueError, match="shape"):
        train_drafter(target, "draft-model", "sft", 1, str(tmp_path / "f"), prompts=_prompts(), options=opts,
                         progress=False, init_params=load_init_params("draft-model", str(tmp_path / "d"), target))


def test_cli_init_fine_tunes_the_given_drafter(target, tmp_path):
    """``specjax train-drafter --init DIR``: at learning rate 0 the output is the --init drafter itself
    (bitwise, through the bf16 export); without --init it is a fresh head (negative control)."""
    from safetensors.numpy import load_file

    from specjax.engine.cli import main

    target_dir = str(tmp_path / "target")
    cfg = target.config
    export_llama(target_dir, target.params, llama_hf_config(cfg, tie_word_embeddings=cfg.tie_word_embeddings,
                                                            bos_token_id=cfg.eos_token_ids[0],
                                                            eos_token_id=cfg.eos_token_ids[0]))
    common = ["train-drafter", "--target", target_dir, "--kind", "eagle3", "--method", "online", "--batch-size", "2",
              "--seq-len", "16", "--ttt-steps", "2"]
    assert main(common + ["--steps", "4", "--out", str(tmp_path / "a")]) == 0
    assert main(common + ["--steps", "1", "--lr", "0", "--init", str(tmp_path / "a"), "--out", str(tmp_path / "b")]) == 0
    assert main(common + ["--steps", "1", "--lr", "0", "--seed", "1", "--out", str(tmp_path / "c")]) == 0
    weights = {name: load_file(str(tmp_path / name / "model.safetensors")) for name in "abc"}
    assert weights["a"].keys() == weights["b"].keys()
    for name, tensor in weights["a"].items():
        np.testing.assert_array_equal(weights["b"][name], tensor)
    assert not np.array_equal(weights["c"]["fc.weight"], weights["a"]["fc.weight"])


def test_bad_arguments_are_named(target, tmp_path):
    with pytest.raises(ValueError, match="kind"):
        train_drafter(target, "medusa", "sft", 1, str(tmp_path))
    with pytest.raises(ValueError, match="method"):
        train_drafter(target, "eagle3", "ppo", 1, str(tmp_path))
    with pytest.raises(ValueError, match="outside the vocab"):
        train_drafter(target, "eagle3", "sft", 1, str(tmp_path), prompts=[[1, 99]])
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="prompt"):
        read_prompts_jsonl(str(bad))
