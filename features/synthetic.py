"""The MMoE synthetic two-task generator (Ma et al., KDD 2018, section 3.2) with a controllable task correlation.

    data = make_synthetic(12_000, p=-0.5, seed=0)
    x, y1, y2, s1, s2 = data      # a NamedTuple, so it unpacks like the paper's tuple

The MMoE paper's synthetic protocol: u1, u2 orthogonal unit vectors in R^d;
``w1 = c u1``, ``w2 = c (p u1 + sqrt(1 - p^2) u2)``;
``x ~ N(0, I_d)``; ``y_k = w_k . x + sum_{i=1..m} sin(alpha_i w_k . x + beta_i) + eps_k`` with ``eps ~ N(0, 0.01^2)``;
alpha, beta ~ N(0, 1), shared by both tasks. PLE's constants: c = 1, m = 10, d = 512. ``p`` is the cosine between
w1 and w2: it sets how related the tasks are (the label correlation is a monotone function of it, not p itself).

Binarisation **(our reading)**: each label is 1 where the regression target is above its median over the generated
set, so both tasks are balanced. The noiseless scores ``s_k`` (the targets without eps) rank the samples as well as
any model can on this data: ``AUC(y_k, s_k)`` is the ceiling to report beside the models' AUC.

Everything is drawn from one seeded ``numpy.random.Generator``: the same arguments give identical arrays. Generate
train, validation and test together in one call (then slice), so they share u, alpha and beta, i.e. the same tasks.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import numpy.typing as npt

__all__ = ["SyntheticData", "make_synthetic"]

F32 = npt.NDArray[np.float32]


class SyntheticData(NamedTuple):
    """``x`` [n, d]; binary labels ``y1``, ``y2`` [n] (float32 0/1); noiseless scores ``noiseless1/2`` [n]."""

    x: F32
    y1: F32
    y2: F32
    noiseless1: F32
    noiseless2: F32


def make_synthetic(
    n: int, p: float, d: int = 512, m: int = 10, c: float = 1.0, seed: int = 0, noise_std: float = 0.01
) -> SyntheticData:
    """``n`` samples of the two-task generator with task correlation ``p`` in [-1, 1]; see the module docstring."""
    if not -1.0 <= p <= 1.0:
        raise ValueError(f"p must lie in [-1, 1], got {p}")
    if d < 2 or n < 1 or m < 0:
        raise ValueError(f"need d >= 2, n >= 1, m >= 0; got d={d}, n={n}, m={m}")
    rng = np.random.default_rng(seed)
    # Two orthonormal vectors: QR of a Gaussian d x 2 matrix (Gram-Schmidt, numerically stable).
    q, _ = np.linalg.qr(rng.standard_normal((d, 2)))
    u1, u2 = q[:, 0], q[:, 1]
    w1 = c * u1
    w2 = c * (p * u1 + np.sqrt(max(0.0, 1.0 - p * p)) * u2)
    alpha = rng.standard_normal(m)
    beta = rng.standard_normal(m)
    x = rng.standard_normal((n, d))

    def score(w: np.ndarray) -> np.ndarray:
        z = x @ w
        return z + np.sin(np.outer(z, alpha) + beta).sum(axis=1)

    s1, s2 = score(w1), score(w2)
    r1 = s1 + noise_std * rng.standard_normal(n)
    r2 = s2 + noise_std * rng.standard_normal(n)
    y1 = (r1 > np.median(r1)).astype(np.float32)
    y2 = (r2 > np.median(r2)).astype(np.float32)
    return SyntheticData(x.astype(np.float32), y1, y2, s1.astype(np.float32), s2.astype(np.float32))
