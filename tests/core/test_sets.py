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
