"""A device drafter's state after prefill and update equals that of the same drafter fed the same
tokens from scratch: the chain draft model fed a path it did not draft (a hybrid's), and chunked
prefill against the whole prompt at once."""

import jax
import jax.numpy as jnp
import numpy as np

from engine_helpers import tiny_model
from specjax.drafters.draft_model import DraftModelDrafter
from specjax.drafters.hybrid import feed_accepted
from specjax.engine.plain import pad_prompts
from specjax.engine.sampling import SamplingParams
from specjax.engine.steps import Accepted, StepAux

VOCAB = 64
PROMPTS = [[5, 17, 33, 8], [9, 42, 61, 7, 7, 3]]
ROOTS = [11, 20]


def prefilled(drafter, prompts, roots, slots: int = 64):
    tokens, lengths = pad_prompts(prompts, VOCAB)
    return jax.jit(drafter.prefill)(drafter.params, drafter.init_state(len(prompts), slots), jnp.asarray(tokens),
                                    jnp.asarray(lengths), jnp.asarray(roots, jnp.int32))


def accepted_of(emitted: list[list[int]], width: int) -> Accepted:
    num = jnp.asarray([len(e) for e in emitted], jnp.int32)
    tokens = jnp.asarray([e + [0] * (width - len(e)) for e in emitted], jnp.int32)
    return Accepted(tokens=tokens, num=num, num_draft_accepted=num - 1, path=jnp.zeros_like(tokens))


def fresh_state(drafter, emitted):
    """The drafter prefilled on prompt + root + the emitted tokens but the last (its new root)."""
    prompts = [p + [r] + e[:-1] for p, r, e in zip(PROMPTS, ROOTS, emitted)]
    return prefilled(drafter, prompts, [e[-1] for e in emitted])


def assert_same_state(got, want):
    np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(want.lengths))
    np.testing.assert_allclose(np.asarray(got.root_logits), np.asarray(want.root_logits), atol=1e-4)
    for b, n in enumerate(np.asarray(want.lengths)):
        np.testing.assert_allclose(np.asarray(got.cache.k[:, b, :, :n]), np.asarray(want.cache.k[:, b, :, :n]),
                                   atol=1e-4)


def test_chain_draft_model_fed_a_path_it_did_not_draft_matches_a_fresh_prefill():
    """In Graft / TAPS the accepted path can be another drafter's or a retrieved branch; the chain's
    shortcut (feed only the tokens past its own chain) must not keep the K/V of its own chain."""
    drafter = DraftModelDrafter(tiny_model(0, vocab=VOCAB), VOCAB, capacity=4)
    params = drafter.params
    dstate = prefilled(drafter, PROMPTS, ROOTS)
    propose = jax.jit(lambda d: drafter.propose(params, d, jnp.asarray(ROOTS), d.lengths - 1,
                                                SamplingParams.make(2, 0.0, 0, 1.0), jax.random.key(0)))
    tree, drafted = propose(dstate)
    chain = np.asarray(tree.tokens).tolist()
    other = lambda t: (t + 1) % VOCAB
    cases = {
        "own chain": [chain[0][:2] + [7], chain[1][:4] + [9]],
        "other first token": [[other(chain[0][0]), 3, 4], [other(chain[1][0]), 5]],
        "other second token": [[chain[0][0], other(chain[0][1]), 6], [chain[1][0], chain[1][1], other(chain[1][2])]],
    }
    feed = jax.jit(lambda d, acc: feed_accepted(drafter, params, d, acc, StepAux(logits=None, hidden=None)))
    shortcut = jax.jit(lambda d, acc: drafter._feed(params, d, acc, jnp.minimum(jnp.maximum(acc.num - 1, 0), 3), 2))
    for name, emitted in cases.items():
        acc = accepted_of(emitted, 5)
        want = fresh_state(drafter, emitted)
        assert_same_state(feed(drafted, acc), want)
        # Negative control: the unconditional shortcut is exact on the own chain only.
        wrong = shortcut(drafted, acc)
        close = np.allclose(np.asarray(wrong.root_logits), np.asarray(want.root_logits), atol=1e-4)
        assert close == (name == "own chain"), name


def random_eagle3(target, chunk: int):
    from specjax.drafters.eagle3 import Eagle3Config, Eagle3Drafter, init_params
    from specjax.models.config import ModelConfig

    t = target.config
    layer = ModelConfig(model_type="llama", vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=64,
                        num_layers=1, num_heads=4, num_kv_heads=2, head_dim=t.hidden_size // 4, rms_norm_eps=1e-5)
    cfg = Eagle3Config(layer, 50, t.hidden_size)
    return Eagle3Drafter(cfg, init_params(cfg, jax.random.key(0)), t.num_layers, capacity=8, topk=2, depth=3,
                         hidden_layers=(0, 1, 2), prefill_chunk=chunk)


LONG_PROMPTS = [[5, 17, 33, 8, 1, 2, 3, 4, 60, 61, 62], [9, 42, 61, 7, 7, 3], [3]]


def prefill_and_first_tree(drafter, target):
    """The drafter's state after prefill (fed the target's prompt features) and its first tree."""
    from specjax.engine.steps import prefill

    tokens, lengths = pad_prompts(LONG_PROMPTS, VOCAB)
    tokens = np.pad(tokens, ((0, 0), (0, 16 - tokens.shape[1])))  # a prompt bucket wider than any prompt
    b = len(LONG_PROMPTS)
    out = prefill(target.params, target.config, jnp.asarray(tokens), jnp.asarray(lengths), jnp.full(b, 8, jnp.int32),
                  jax.random.key(0), SamplingParams.make(b, 0.0, 0, 1.0), max_len=64,
                  hidden_layers=tuple(drafter.hidden_layers))
    state, first, hidden = out.state, out.first_tokens, out.hidden
    dstate = jax.jit(drafter.prefill)(drafter.params, drafter.init_state(b, 64), jnp.asarray(tokens),
                                      jnp.asarray(lengths), first, hidden)
    tree, _ = jax.jit(lambda d: drafter.propose(drafter.params, d, first, state.lengths,
                                                SamplingParams.make(b, 0.0, 0, 1.0), jax.random.key(1)))(dstate)
    return dstate, tree


def test_chunked_drafter_prefill_equals_the_whole_prompt_at_once():
    """Chunks of 4 (a prompt of 16 padded positions, rows ending in different chunks) against one chunk:
    the same cache rows, root and first tree, for a draft model (tree and chain) and an EAGLE-3 head."""
    target = tiny_model(2, vocab=VOCAB)
    drafters = {
        "draft tree": lambda c: DraftModelDrafter(tiny_model(0, vocab=VOCAB), VOCAB, capacity=8, topk=2, depth=3,
                                                  prefill_chunk=c),
        "draft chain": lambda c: DraftModelDrafter(tiny_model(0, vocab=VOCAB), VOCAB, capacity=4, prefill_chunk=c),
        "eagle3": lambda c: random_eagle3(target, c),
    }
    for name, make in drafters.items():
        (whole, whole_tree), (chunked, chunked_tree) = (prefill_and_first_tree(make(c), target) for c in (512, 4))
        np.testing.assert_array_equal(np.asarray(chunked.lengths), np.asarray(whole.lengths))
        root = "root_hidden" if name == "eagle3" else "root_logits"
        np.testing.assert_allclose(np.asarray(getattr(chunked, root)), np.asarray(getattr(whole, root)), atol=1e-4,
                                   err_msg=name)
        for b, n in enumerate(np.asarray(whole.lengths)):
            np.testing.assert_allclose(np.asarray(chunked.cache.k[:, b, :, :n]), np.asarray(whole.cache.k[:, b, :, :n]),
                                       atol=1e-4, err_msg=name)
        for field in ("tokens", "parents", "valid"):
            np.testing.assert_array_equal(np.asarray(getattr(chunked_tree, field)),
                                          np.asarray(getattr(whole_tree, field)), err_msg=f"{name} {field}")


def test_chunked_drafter_prefill_stays_lossless():
    from specjax.engine.device_loop import generate_on_device
    from specjax.engine.engine import Engine
    from specjax.engine.plain import greedy_generate

    target = tiny_model(2, vocab=VOCAB)
    expected = greedy_generate(target, LONG_PROMPTS, 12)
    engine = Engine(target, None, attention="xla")
    for drafter in (DraftModelDrafter(target, VOCAB, capacity=4, prefill_chunk=4), random_eagle3(target, 4)):
        results = generate_on_device(engine, LONG_PROMPTS, 12, drafter=drafter)
        assert [r.token_ids for r in results] == expected
