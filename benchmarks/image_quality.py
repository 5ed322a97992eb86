"""Quality of generated digit images: a small classifier trained on drawn digits, its class accuracy
on generated images, and a Fréchet distance between its features of generated and drawn images.

Why our own classifier: FID's usual Inception features know nothing of 32 x 32 seven-segment
digits in a 64-colour palette; a classifier trained on the same kind of images (drawn by
``image_tokens.draw_digits``, quantized to the 16 x 16 token grid and decoded, as generated
images are) scores what matters here: is the right digit drawn, and do the images look like the
data. Its features are the hidden layer of a one-hidden-layer MLP; the Fréchet distance is FID's
formula on them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from specjax.models import image_tokens

HIDDEN = 32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Classifier:
    w1: jax.Array
    b1: jax.Array
    w2: jax.Array
    b2: jax.Array


def drawn_images(n: int, seed: int, grid: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(images [n, 32, 32, 3] uint8, labels [n]): drawn digits through the token grid, as generated."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, image_tokens.NUM_CLASSES, n)
    return image_tokens.decode(image_tokens.encode(image_tokens.draw_digits(labels, rng), grid)), labels


def _inputs(images: np.ndarray) -> jax.Array:
    return jnp.asarray(images, jnp.float32).reshape(len(images), -1) / 255.0


def _hidden(params: Classifier, x: jax.Array) -> jax.Array:
    return jax.nn.relu(x @ params.w1 + params.b1)


def _logits(params: Classifier, x: jax.Array) -> jax.Array:
    return _hidden(params, x) @ params.w2 + params.b2


def train_classifier(steps: int = 600, batch_size: int = 256, seed: int = 0) -> Classifier:
    """The MLP trained on freshly drawn images (seeds from ``seed``; evaluation sets use others)."""
    images, labels = drawn_images(steps * batch_size // 8, seed)  # each image seen about 8 times
    x, y = _inputs(images), jnp.asarray(labels)
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = Classifier(jax.random.normal(k1, (x.shape[1], HIDDEN)) * x.shape[1] ** -0.5, jnp.zeros(HIDDEN),
                        jax.random.normal(k2, (HIDDEN, image_tokens.NUM_CLASSES)) * HIDDEN ** -0.5,
                        jnp.zeros(image_tokens.NUM_CLASSES))
    optimizer = optax.adam(3e-3)

    @jax.jit
    def update(params, opt_state, xb, yb):
        loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(_logits(p, xb), yb).mean()  # noqa: E731
        grads = jax.grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state

    opt_state = optimizer.init(params)
    order = np.random.default_rng(seed).permutation(np.resize(np.arange(len(x)), steps * batch_size))
    for step in range(steps):
        rows = order[step * batch_size: (step + 1) * batch_size]
        params, opt_state = update(params, opt_state, x[rows], y[rows])
    return params


def class_accuracy(params: Classifier, images: np.ndarray, labels) -> float:
    predicted = np.asarray(jnp.argmax(_logits(params, _inputs(images)), axis=-1))
    return float(np.mean(predicted == np.asarray(labels)))


def features(params: Classifier, images: np.ndarray) -> np.ndarray:
    return np.asarray(_hidden(params, _inputs(images)), np.float64)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID's formula on two feature sets [n, d]: |mu_a - mu_b|^2 + tr(Ca + Cb - 2 (Ca Cb)^(1/2)).

    tr((Ca Cb)^(1/2)) is the sum of the square roots of the eigenvalues of Ca^(1/2) Cb Ca^(1/2),
    which is symmetric positive semi-definite, so numpy's eigh suffices (no scipy)."""
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)
