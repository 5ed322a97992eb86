"""Seeds: a request's sampled output depends on its seed, never on the batch, the engine's past or the tree.

Every draw folds the request's key with the absolute position of the token drawn
(``specjax.engine.sampling.position_keys``), and acceptance emits the target's own
draw at each position (``steps._sampled_walk``). So, with the auto tree size on,
a request gives the same tokens alone or among other prompts (a batch of 4), on a
fresh engine or one that has already run (whose policy state picks other tree
sizes), and with any drafter the same tokens as plain sampling (``generate_plain``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine_helpers import OracleTreeDrafter, grow_chunk_policies_to_every_size, near_copy, tiny_model
from specjax.drafters import device
from specjax.drafters.draft_model import DraftModelDrafter
from specjax.drafters.token_recycling import TokenRecyclingDrafter
from specjax.engine.engine import Engine
from specjax.engine.plain import generate_plain
from specjax.engine.sampling import gumbel_argmax, position_keys, request_keys, request_seeds

VOCAB = 64
MODEL = tiny_model(5, vocab=VOCAB)
PROMPT = [5, 17, 33, 8, 2]
OTHERS = [[9, 42, 61, 7, 7, 3, 30, 11, 12, 40, 41], [3], [50, 51, 52, 53, 54, 55, 56]]
SEED = 7
NEW = 12
SETTINGS = dict(temperature=1.3, top_p=0.97)
BATCH = [OTHERS[0], PROMPT, OTHERS[1], OTHERS[2]]
BATCH_SEEDS = [40, SEED, 41, 42]  # PROMPT keeps its seed in the batch


def plain(prompts, seed):
    return generate_plain(MODEL, prompts, NEW, seed=seed, **SETTINGS)


def alone_batched_and_again(engine: Engine) -> list:
    """PROMPT's tokens alone, in the batch of 4, then alone again on the now used engine."""
    alone = engine.generate([PROMPT], NEW, seed=SEED, **SETTINGS)[0]
    batched = engine.generate(BATCH, NEW, seed=BATCH_SEEDS, **SETTINGS)
    again = engine.generate([PROMPT], NEW, seed=SEED, **SETTINGS)[0]
    assert sum(r.accepted_draft_tokens for r in [alone, *batched, again]) > 0  # trees were verified
    return [alone.token_ids, batched[1].token_ids, again.token_ids]


def test_plain_sampling_depends_on_the_request_seed_only():
    alone = plain([PROMPT], SEED)[0]
    assert plain(BATCH, BATCH_SEEDS)[1] == alone
    assert plain(BATCH, SEED - 1)[1] == alone  # an int seed: prompt i gets seed + i
    assert plain([PROMPT], SEED + 1)[0] != alone  # the seed matters (the settings really sample)


def test_host_drafter_samples_what_plain_sampling_samples():
    """Random trees that follow the plain output at 70% per node: whatever the auto policy and the
    drafter's random choices verify, the output is plain sampling's, alone, batched and again."""
    references = {tuple(p): out for p, out in zip(BATCH, plain(BATCH, BATCH_SEEDS))}
    shapes = [[-1, 0, 1, 2], [-1, -1, 0, 1, 0], [-1, 0, 0, 1, 2, 3, 4]]
    engine = Engine(MODEL, OracleTreeDrafter(references, shapes, 0.7, VOCAB, seed=1), draft_capacity="auto",
                    max_draft_capacity=4, attention="xla")
    assert alone_batched_and_again(engine) == [references[tuple(PROMPT)]] * 3


@pytest.mark.parametrize("name", ["draft_model_tree", "token_recycling"])
def test_device_drafters_sample_what_plain_sampling_samples(name):
    """The device loop with the auto size: the draft model's sampled tree (its first children share
    the target's noise) and Token Recycling's point-mass tree give plain sampling's tokens."""
    drafter = (DraftModelDrafter(near_copy(MODEL, 0.05, seed=3), VOCAB, capacity=4, topk=2, depth=2)
               if name == "draft_model_tree" else TokenRecyclingDrafter(VOCAB, capacity=8))
    engine = Engine(MODEL, drafter, draft_capacity="auto", max_draft_capacity=4, attention="xla")
    assert alone_batched_and_again(engine) == [plain([PROMPT], SEED)[0]] * 3


def test_sampled_trees_cut_to_every_size_sample_what_plain_sampling_samples(monkeypatch):
    """The auto size cuts a sampled draft-model tree (q dropped, its most probable nodes kept) to
    each smaller bucket: the tokens are still plain sampling's."""
    grow_chunk_policies_to_every_size(monkeypatch)
    drafter = DraftModelDrafter(near_copy(MODEL, 0.05, seed=3), VOCAB, capacity=4, topk=2, depth=2)
    engine = Engine(MODEL, drafter, draft_capacity="auto", max_draft_capacity=4, attention="xla")
    assert alone_batched_and_again(engine) == [plain([PROMPT], SEED)[0]] * 3
    sizes = {t for policy in engine._chunk_policies.values() for t, _ in policy.history}
    assert {1, 2} <= sizes  # cut below the drafter's 4 nodes


def test_sampled_children_share_the_targets_noise():
    """The Gumbel coupling: a sampled node's children are the top k of log q + G, G the noise the
    target draws its token with at their position, so the target's draw is among them far more
    often than among children drawn with other noise; with one child, at least (1 - TV) / (1 + TV)."""
    rng = np.random.default_rng(0)
    rows = 4000
    logp = jax.nn.log_softmax(jnp.asarray(rng.normal(0, 2, VOCAB), jnp.float32))
    logq = jax.nn.log_softmax(logp + jnp.asarray(rng.normal(0, 0.7, VOCAB), jnp.float32))
    tv = 0.5 * float(jnp.abs(jnp.exp(logp) - jnp.exp(logq)).sum())
    keys, positions = request_keys(np.arange(rows)), jnp.full(rows, 17)
    target = np.asarray(gumbel_argmax(position_keys(keys, positions), jnp.broadcast_to(logp, (rows, VOCAB))))

    def hit_rate(draft_keys, k: int) -> float:
        children, _, _ = jax.jit(device._children, static_argnames=("k", "with_q", "target_vocab"))(
            draft_keys, positions, jnp.broadcast_to(logq, (rows, 1, VOCAB)), jnp.ones(rows), k=k, with_q=True,
            target_ids=jnp.arange(VOCAB), target_vocab=VOCAB)
        return float(np.mean(np.any(np.asarray(children)[:, 0] == target[:, None], axis=1)))

    coupled, other_noise = hit_rate(keys, 1), hit_rate(request_keys(np.arange(rows) + rows), 1)
    assert coupled >= (1 - tv) / (1 + tv) - 0.02  # the bound, less sampling slack (4000 rows)
    assert coupled > other_noise + 0.2  # uncoupled: sum_v p(v) q(v)
    assert hit_rate(keys, 3) > coupled + 0.05  # more children, drawn without replacement, catch more


@pytest.mark.parametrize("seed, match", [([1, 2], "2 values for 3 prompts"), (-1, r"\[0, 2\*\*32\)"),
                                         (1.5, "an int or one int per prompt"), (True, "an int")])
def test_bad_seeds_are_refused(seed, match):
    with pytest.raises(ValueError, match=match):
        request_seeds(seed, 3)
