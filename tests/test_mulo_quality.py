"""The image-quality scores of the MuLo-SD benchmark (``benchmarks/image_quality.py``): the Fréchet
distance is FID's formula, and the classifier tells digits apart and drawn images from broken ones.

Negative controls: a Fréchet distance without the cross-covariance term (a plausible slip) differs
from scipy's formula; images whose labels are wrong score low; images without digits score far from
the drawn ones.
"""

import numpy as np
import pytest

from engine_helpers import load_benchmark

quality = load_benchmark("image_quality")


def scipy_frechet(a, b) -> float:
    from scipy import linalg

    mu_a, mu_b, cov_a, cov_b = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * linalg.sqrtm(cov_a @ cov_b).real))


def test_mulo_quality_frechet_distance_is_fids_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 6)), rng.normal(0.3, 1.5, size=(200, 6)) @ rng.normal(size=(6, 6))
    assert quality.frechet_distance(a, b) == pytest.approx(scipy_frechet(a, b), rel=1e-6)
    assert quality.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    no_cross = float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(np.cov(a, rowvar=False))
                     + np.trace(np.cov(b, rowvar=False)))
    assert abs(no_cross - scipy_frechet(a, b)) > 1.0  # the control: the slip is caught


@pytest.fixture(scope="module")
def classifier():
    return quality.train_classifier(steps=200)


def test_mulo_quality_classifier_reads_held_out_digits(classifier):
    images, labels = quality.drawn_images(300, seed=7)
    assert quality.class_accuracy(classifier, images, labels) > 0.9
    assert quality.class_accuracy(classifier, images, (labels + 1) % 10) < 0.2  # wrong labels score low


def test_mulo_quality_frechet_distance_tells_broken_images_apart(classifier):
    reference = quality.features(classifier, quality.drawn_images(500, seed=11)[0])
    images, _ = quality.drawn_images(100, seed=12)
    drawn = quality.frechet_distance(quality.features(classifier, images), reference)
    backgrounds = images.min(axis=(1, 2), keepdims=True).repeat(32, 1).repeat(32, 2)  # no digit: background only
    blank = quality.frechet_distance(quality.features(classifier, backgrounds), reference)
    assert blank > 5 * drawn
