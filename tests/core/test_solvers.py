"""The dense spectral solve against NumPy's pseudo-inverse."""

import numpy as np
import torch
from hypothesis import given, settings, strategies as st

from problems import singular_symmetric
from setsens.solvers import Spectrum


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), p=st.integers(4, 30), indefinite=st.booleans())
def test_dense_min_norm_equals_pinv(seed, p, indefinite):
    A, g = singular_symmetric(p, max(1, p // 2), seed, indefinite)
    b = torch.randn(p, generator=g, dtype=torch.float64)  # generally outside range(A)
    v = Spectrum.of(A).solve(b, tau=1e-8)
    ref = -np.linalg.pinv(A.numpy(), rcond=1e-8, hermitian=True) @ b.numpy()
    assert np.allclose(v.numpy(), ref, atol=1e-8)
