"""MMoE synthetic generator (features.synthetic)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from features.synthetic import make_synthetic


def test_shapes_types_and_balance() -> None:
    data = make_synthetic(2_000, p=0.5, d=32, seed=1)
    x, y1, y2, s1, s2 = data
    assert x.shape == (2_000, 32) and x.dtype == np.float32
    for y in (y1, y2):
        assert y.shape == (2_000,) and set(np.unique(y).tolist()) == {0.0, 1.0}
        assert y.mean() == pytest.approx(0.5, abs=1e-3)  # binarised at the median
    assert s1.shape == s2.shape == (2_000,)


def test_deterministic_and_seed_dependent() -> None:
    a = make_synthetic(500, p=0.9, d=16, seed=3)
    b = make_synthetic(500, p=0.9, d=16, seed=3)
    c = make_synthetic(500, p=0.9, d=16, seed=4)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a.x, c.x)


def test_noiseless_score_is_near_perfect_ceiling() -> None:
    # eps ~ N(0, 0.01^2) is tiny next to the score's spread: the ceiling is close to 1 (the spec quotes 0.99996).
    data = make_synthetic(20_000, p=0.0, seed=0)
    for y, s in ((data.y1, data.noiseless1), (data.y2, data.noiseless2)):
        assert roc_auc_score(y, s) > 0.999


def test_p_controls_task_correlation() -> None:
    corr = []
    for p in (-0.9, -0.5, 0.0, 0.5, 0.9, 1.0):
        data = make_synthetic(20_000, p=p, d=64, seed=0)
        corr.append(float(np.corrcoef(data.noiseless1, data.noiseless2)[0, 1]))
    assert all(b > a for a, b in itertools.pairwise(corr))
    assert corr[-1] == pytest.approx(1.0, abs=1e-6)  # p = 1: identical tasks
    assert abs(corr[2]) < 0.05  # p = 0: orthogonal weight vectors, (nearly) uncorrelated targets


def test_weight_vectors_have_cosine_p() -> None:
    # w1 . x and w2 . x are jointly Gaussian with correlation p: check it on the linear parts.
    data = make_synthetic(50_000, p=-0.5, d=8, m=0, seed=2)  # m = 0: the targets are the linear parts
    assert float(np.corrcoef(data.noiseless1, data.noiseless2)[0, 1]) == pytest.approx(-0.5, abs=0.02)


def test_rejects_bad_p() -> None:
    with pytest.raises(ValueError, match="p must"):
        make_synthetic(10, p=1.5)
