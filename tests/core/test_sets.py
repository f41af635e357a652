"""Set distances: definitions, metric properties, affine sets against brute force."""

import torch
from hypothesis import given, settings, strategies as st

from setsens.sets import AffineBall, excess, hausdorff, point_to_set

points = st.integers(1, 6).flatmap(lambda k: st.lists(st.lists(st.floats(-5, 5), min_size=3, max_size=3), min_size=k, max_size=k))


@settings(max_examples=50, deadline=None)
@given(A=points, B=points, C=points)
def test_hausdorff_is_a_metric_on_finite_sets(A, B, C):
    A, B, C = (torch.tensor(s, dtype=torch.float64) for s in (A, B, C))
    assert hausdorff(A, B) == hausdorff(B, A)
    assert hausdorff(A, A) == 0
    assert hausdorff(A, C) <= hausdorff(A, B) + hausdorff(B, C) + 1e-9
    assert excess(A, B) <= hausdorff(A, B)


def test_affine_ball_distance_against_brute_force():
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(5, 2, generator=g, dtype=torch.float64))
    centre = torch.zeros(5, dtype=torch.float64)
    point = torch.tensor([0.3, 0, 0, 0, 0], dtype=torch.float64)
    C = AffineBall(point, basis, centre, radius=1.0)
    # brute force over a fine polar grid of the 2-D disc inside the affine set
    r = torch.linspace(0, C.inner_radius, 200, dtype=torch.float64)
    t = torch.linspace(0, 2 * torch.pi, 400, dtype=torch.float64)
    R, T = torch.meshgrid(r, t, indexing="ij")
    pts = C.point + (R.reshape(-1, 1) * torch.cos(T).reshape(-1, 1)) * basis[:, 0] + (R.reshape(-1, 1) * torch.sin(T).reshape(-1, 1)) * basis[:, 1]
    assert float(pts.norm(dim=1).max()) <= 1.0 + 1e-9
    for _ in range(5):
        w = 2 * torch.randn(5, generator=g, dtype=torch.float64)
        brute = float((pts - w).norm(dim=1).min())
        assert abs(C.distance(w) - brute) < 1e-2
        assert C.distance(w) <= brute + 1e-12
        far = float((pts - w).norm(dim=1).max())
        assert abs(C.farthest_from(w) - far) < 1e-2
        assert abs(excess(C, w[None]) - far) < 1e-2
    assert point_to_set(C.point, C) == 0.0


def test_excess_of_a_segment_over_two_points_is_exact():
    """The review's case: the farthest point of a segment from {d₁, d₂} sits between them (0.75), not
    at an end (0.5)."""
    basis = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    C = AffineBall(torch.zeros(2, dtype=torch.float64), basis, torch.zeros(2, dtype=torch.float64), radius=1.0)
    D = torch.tensor([[-1.0, 0.0], [0.5, 0.0]], dtype=torch.float64)
    assert abs(excess(C, D) - 0.75) < 1e-12
    t = torch.linspace(-1, 1, 20001, dtype=torch.float64)
    brute = float(torch.cdist(torch.stack([t, 0 * t], 1), D).min(dim=1).values.max())
    assert abs(excess(C, D) - brute) < 1e-4


@settings(max_examples=20, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), m=st.integers(2, 4), use_projector=st.booleans())
def test_excess_of_a_ball_over_a_finite_set_is_attained_and_not_beaten(seed, m, use_projector):
    """dim N > |D|: the value is attained by a point of C, and no sampled point of C exceeds it."""
    g = torch.Generator().manual_seed(seed)
    p, r = 9, m + 2
    basis, _ = torch.linalg.qr(torch.randn(p, r, generator=g, dtype=torch.float64))
    centre = torch.zeros(p, dtype=torch.float64)
    point = 0.3 * torch.randn(p, generator=g, dtype=torch.float64)
    null = (lambda z: basis @ (basis.T @ z)) if use_projector else basis
    C = AffineBall(point, null, centre, radius=1.5)
    D = torch.randn(m, p, generator=g, dtype=torch.float64)
    value = excess(C, D)
    z = torch.randn(20000, r, generator=g, dtype=torch.float64)
    z = z / z.norm(dim=1, keepdim=True) * C.inner_radius * torch.rand(20000, 1, generator=g, dtype=torch.float64) ** (1 / r)
    samples = C.point + z @ basis.T
    brute = float(torch.cdist(samples, D).min(dim=1).values.max())
    assert brute <= value + 1e-7
    assert value <= brute * 1.05 + 1e-9  # and a sampled lower bound comes close
