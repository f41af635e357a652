"""setsens.gram: the Gram matrix and products with G from per-sample Jacobians in panels, never holding G,
against the dense Jacobian; the streamed Gram factor against the dense one."""

from dataclasses import replace

import pytest
import torch
from problems import fitted_problem

from setsens.audit import GramFactor, answer_queries, group_modulus, scan
from setsens.gram import (REFINE_TOL, block_error, block_pcg, fingerprint, gram_matrix, gram_solve, jacobian_products,
                          plan, relative_rise, resumable_plan)
from setsens.operators import dense_output_jacobian
from setsens.problem import Perturbation, cross_entropy, squared_error


@pytest.mark.parametrize("loss", [squared_error, cross_entropy])
@pytest.mark.parametrize("panel", [1, 3, 10])
def test_gram_matrix_is_the_dense_one(loss, panel):
    problem = fitted_problem(loss, n=10, k=3)
    problem.batch_size = 4  # panels and chunks straddle the batches
    centered = loss is cross_entropy
    G = dense_output_jacobian(problem, centered=centered)
    M = gram_matrix(problem, centered, panel)
    assert torch.allclose(M, G @ G.T, rtol=0, atol=1e-12 * float(M.abs().max()))
    assert float((M - torch.diag(M.diagonal())).abs().max()) > 0.1 * float(M.abs().max())  # off-diagonal blocks


def test_float32_jacobians_are_summed_in_float64():
    problem = fitted_problem(cross_entropy, n=6, k=3).with_dtype(torch.float32)
    G = dense_output_jacobian(problem, centered=True).double()
    M = gram_matrix(problem, True, 2)
    assert M.dtype == torch.float64
    assert torch.allclose(M, G @ G.T, rtol=0, atol=1e-6 * float(M.abs().max()))


def test_jacobian_products_are_the_dense_products():
    problem = fitted_problem(cross_entropy, n=9, k=3)
    problem.batch_size = 4
    G = dense_output_jacobian(problem, centered=True)
    g = torch.Generator().manual_seed(0)
    V, U = torch.randn(5, problem.p, generator=g, dtype=torch.float64), torch.randn(4, 27, generator=g,
                                                                                   dtype=torch.float64)
    GV, GTU, blocks = jacobian_products(problem, True, right=V, left=U, diagonal=True)
    assert torch.allclose(GV, V @ G.T, atol=1e-12)
    assert torch.allclose(GTU, U @ G, atol=1e-12)  # U is centred by the products, as G's rows are
    M = G @ G.T
    assert torch.allclose(blocks, torch.stack([M[3 * k:3 * k + 3, 3 * k:3 * k + 3] for k in range(9)]), atol=1e-12)


@pytest.mark.parametrize("loss", [squared_error, cross_entropy])
def test_streamed_factor_equals_the_dense_factor(loss):
    problem = fitted_problem(loss, n=10, k=3)
    dense, streamed = GramFactor(problem, path="dense"), GramFactor(problem, path="streamed", memory=10**9)
    assert (dense.plan.path, streamed.plan.path, streamed.G) == ("dense", "streamed", None)
    assert dense.rank == streamed.rank
    a, b = scan(problem, dense), scan(problem, streamed)
    assert torch.allclose(a.kappa, b.kappa, rtol=1e-10) and torch.equal(a.ranking, b.ranking)
    assert float(a.kappa.max() / a.kappa.min()) > 1.5
    g = torch.Generator().manual_seed(3)
    for m in (1, 4):  # a few rows through JVP/VJP passes, many through one Jacobian pass
        r = torch.randn(m, problem.n, 3, generator=g, dtype=torch.float64)
        w = torch.randn(m, problem.p, generator=g, dtype=torch.float64)
        assert torch.allclose(streamed @ r, dense @ r, rtol=1e-9, atol=1e-12)
        assert torch.allclose(streamed.T @ w, dense.T @ w, rtol=1e-9, atol=1e-12)
    k = int(b.ranking[0])
    worst = answer_queries(problem, [Perturbation(torch.tensor([k]), b.direction[k][None])], streamed)[0]
    assert float(worst.norm()) == pytest.approx(float(a.kappa[k]), rel=1e-8)


def test_gram_matrix_resumes_after_its_last_panel(tmp_path):
    problem = fitted_problem(cross_entropy, n=10, k=3)
    whole = gram_matrix(problem, True, 3)
    seen = []

    def stop_after_two(event):
        seen.append(event.done)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        gram_matrix(problem, True, 3, progress=stop_after_two, checkpoint=tmp_path / "gram.pt")
    resumed = []
    again = gram_matrix(problem, True, 3, progress=lambda event: resumed.append(event.done),
                        checkpoint=tmp_path / "gram.pt")
    assert seen == [3, 6] and resumed == [9, 10]  # the two saved panels were not recomputed
    assert torch.equal(again, whole)


def test_a_rerun_resumes_its_checkpoint_whatever_memory_the_plan_sees_now(tmp_path):
    """The plan follows the memory free now, and the checkpoint's key holds the panel or the rank: a rerun whose plan
    came out different (simulated by asking for another) takes the saved panel or rank and recomputes nothing; a
    larger saved panel, or a saved rank above the one asked for, starts afresh."""
    problem = fitted_problem(cross_entropy, n=10, k=3)
    streamed = GramFactor(problem, path="streamed", checkpoint=str(tmp_path / "g"))
    assert streamed.plan.panel == 10
    small = plan(problem.n, 3, problem.p, 8, path="streamed")
    assert resumable_plan(replace(small, panel=4), problem, tmp_path / "g", 3, True, 1000, 1, 0).panel == 4
    assert resumable_plan(replace(small, panel=12), problem, tmp_path / "g", 3, True, 1000, 1, 0).panel == 10
    sketchy = _dependent_problem()
    seen = []
    GramFactor(sketchy, path="nystrom", rank=10, checkpoint=str(tmp_path / "s"))
    again = GramFactor(sketchy, path="nystrom", rank=12, checkpoint=str(tmp_path / "s"), progress=seen.append)
    assert again.plan.rank == 10 and [e.done for e in seen] == [4]  # the finished sketch: no Jacobian pass
    fresh = GramFactor(sketchy, path="nystrom", rank=8, checkpoint=str(tmp_path / "s"))
    assert fresh.plan.rank == 8


def test_a_checkpoint_is_keyed_by_the_data_too(tmp_path):
    """A rerun on other data of the same size (one input nudged, or one label changed) starts afresh instead of
    resuming another Gram matrix; the same data in other batches resume."""
    from setsens.problem import Problem

    problem = fitted_problem(cross_entropy, n=10, k=3)
    gram_matrix(problem, True, 3, checkpoint=tmp_path / "gram.pt")
    x, y = problem.inputs.clone(), problem.targets.clone()
    x[7, 1] += 1e-3
    relabelled = y.clone()
    relabelled[2] = (relabelled[2] + 1) % 3
    for data in ((x, y), (problem.inputs, relabelled)):
        other = Problem(problem.model, cross_entropy, data, params=problem.params)
        seen = []
        M = gram_matrix(other, True, 3, progress=lambda e: seen.append(e.done), checkpoint=tmp_path / "gram.pt")
        assert seen == [3, 6, 9, 10] and torch.equal(M, gram_matrix(other, True, 3))  # all four panels computed
        gram_matrix(problem, True, 3, checkpoint=tmp_path / "gram.pt")  # the original's again, for the next case
    rebatched = Problem(problem.model, cross_entropy, (problem.inputs, problem.targets), params=problem.params,
                        batch_size=4)
    seen = []
    gram_matrix(rebatched, True, 3, progress=lambda e: seen.append(e.done), checkpoint=tmp_path / "gram.pt")
    assert seen == []  # finished and resumed: no panel computed


def test_a_checkpoint_is_keyed_by_the_weights_bytes_whatever_the_thread_count():
    """The resume key: the same weights give the same key on 1 and 2 threads (a float64 sum of ResNet-56's weights
    did not: it differed in its last bit, and a 2-thread rerun restarted a 1-thread run's Gram matrix), and a weight
    one ulp away gives another."""
    w = torch.randn(853_018, generator=torch.Generator().manual_seed(0))
    threads, keys = torch.get_num_threads(), []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            keys.append(fingerprint(w))
    finally:
        torch.set_num_threads(threads)
    nudged = w.clone()
    nudged[12_345] = torch.nextafter(nudged[12_345], torch.tensor(float("inf")))
    assert keys[0] == keys[1] != fingerprint(nudged)
    assert fingerprint(w.double()) != keys[0]


def test_the_sketch_and_its_refinement_resume_where_they_stopped(tmp_path):
    """Interrupted in the sketch's second power iteration and in the refinement's third CG iteration, a rerun with
    the same checkpoint redoes one Jacobian pass of the sketch and none of the finished iterations, and ends where
    an uninterrupted run ends."""
    problem = _dependent_problem()
    whole = GramFactor(problem, path="nystrom", rank=10, power=2)
    rhs = whole.rows(torch.randn(4, problem.n, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)).T
    X = gram_solve(problem, True, rhs, whole.gram_inverse, 1e-12, 6)[0]

    def stop_at(stage, count, seen):
        def progress(event):
            seen.append(event.done)
            if event.stage == stage and event.done == count:
                raise KeyboardInterrupt
        return progress

    seen, resumed = [], []
    with pytest.raises(KeyboardInterrupt):
        GramFactor(problem, path="nystrom", rank=10, power=2, checkpoint=tmp_path / "f", progress=stop_at("sketch", 4, seen))
    again = GramFactor(problem, path="nystrom", rank=10, power=2, checkpoint=tmp_path / "f",
                       progress=lambda e: resumed.append(e.done))
    assert seen == [1, 2, 3, 4] and resumed == [3, 4, 5, 6]  # iteration 1's Ω was saved: its left pass is redone
    assert torch.allclose(again.gram_inverse.block(torch.arange(6)), whole.gram_inverse.block(torch.arange(6)))
    finished = []  # the finished sketch is saved: a third run does no pass
    third = GramFactor(problem, path="nystrom", rank=10, power=2, checkpoint=tmp_path / "f",
                       progress=lambda e: finished.append(e.done))
    assert finished == [6] and torch.equal(third.gram_inverse.EiL, again.gram_inverse.EiL)
    assert torch.equal(third.gram_inverse.block(torch.arange(6)), again.gram_inverse.block(torch.arange(6)))
    redone = []  # another rcond: the sketch's last two passes are redone from the saved Ω
    GramFactor(problem, path="nystrom", rank=10, power=2, checkpoint=tmp_path / "f", rcond=1e-3,
               progress=lambda e: redone.append(e.done))
    assert redone == [5, 6]
    seen, resumed = [], []
    with pytest.raises(KeyboardInterrupt):
        gram_solve(problem, True, rhs, again.gram_inverse, 1e-12, 6, stop_at("refine", 3, seen), tmp_path / "s")
    Y, residual, done = gram_solve(problem, True, rhs, again.gram_inverse, 1e-12, 6,
                                   lambda e: resumed.append(e.done), tmp_path / "s")[:3]
    assert seen == [1, 2, 3] and resumed == [4, 5, 6] and done == 6 and residual > 1e-12
    assert torch.allclose(Y, X, rtol=1e-8, atol=1e-12 * float(X.abs().max()))


def test_plan_holds_g_when_it_fits_streams_when_not_and_sketches_when_the_gram_does_not_fit():
    assert plan(100, 10, 1000, 8, memory=10**9).path == "dense"
    streamed = plan(1000, 10, 853_018, 4, memory=12 * 10**9)
    assert streamed.path == "streamed" and 16 <= streamed.panel < 1000 and streamed.bytes <= 12 * 10**9
    with pytest.raises(ValueError, match="do not fit.*nystrom"):  # the 50 000² Gram matrix alone is 20 GB
        plan(5000, 10, 853_018, 4, memory=12 * 10**9, path="streamed")
    sketch = plan(5000, 10, 853_018, 4, memory=12 * 10**9)  # approximate: only when the exact Gram cannot fit
    assert sketch.path == "nystrom" and 100 <= sketch.rank <= 1000 and sketch.bytes <= 12 * 10**9
    with pytest.raises(ValueError, match="rank-1"):
        plan(5000, 10, 853_018, 4, memory=10**9, path="nystrom")
    with pytest.raises(ValueError, match="path"):
        plan(10, 2, 10, 8, path="sparse")


@pytest.mark.parametrize("path", ["dense", "streamed"])
def test_a_float32_network_gets_the_moduli_of_its_float64_copy(path):
    """G in float32, GGᵀ summed in float64 and its centring projected exactly: κ as the float64 problem's to
    ~1e-6 on a network whose G has condition ≈ 2700 (a float32 Gram was off by 1 %, and kept 30 centring
    directions as eigenvalues)."""
    from torch import nn

    from setsens.problem import Problem

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 3))
    x = torch.randn(60, 5, generator=torch.Generator().manual_seed(0))
    y = x[:, :3].argmax(1)
    opt = torch.optim.AdamW(model.parameters(), 1e-2)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    problem = Problem(model, cross_entropy, (x, y))
    single, double = GramFactor(problem, path=path, memory=10**9), GramFactor(problem.with_dtype(torch.float64))
    assert single.rank == double.rank == 120  # 60 points × (3 − 1) centred outputs
    kappa, reference = scan(problem, single).kappa.double(), scan(problem.with_dtype(torch.float64), double).kappa
    assert float(((kappa - reference).abs() / reference).max()) < 1e-4


def _sketchable_problem(n=30, d=400, k=3, seed=0):
    """A linear classifier on n points in d ≫ n dimensions made of a shared rank-3 part and independent noise: GGᵀ
    is a low-rank coupling plus nearly block-diagonal rest, the regime the Nyström path is for."""
    from torch import nn

    from setsens.problem import Problem

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(d, 3, generator=g, dtype=torch.float64)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64) @ U.T + torch.randn(n, d, generator=g, dtype=torch.float64)
    return Problem(nn.Linear(d, k).double(), cross_entropy, (x / d ** 0.5, torch.randint(0, k, (n,), generator=g)))


def _dependent_problem(n=30, hidden=64, k=3, seed=0):
    """A tanh network on 3-dimensional inputs: its points' gradients nearly dependent, GGᵀ's inverse far from what
    a low-rank sketch and the diagonal blocks see."""
    from torch import nn

    from setsens.problem import Problem

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, k)).double()
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return Problem(model, cross_entropy, (x, torch.randint(0, k, (n,), generator=g)))


def test_nystrom_inverse_is_the_woodbury_inverse_of_its_approximation():
    from setsens.gram import NystromInverse

    g = torch.Generator().manual_seed(0)
    n, k, r = 6, 3, 4
    B = torch.randn(n, k, 5, generator=g, dtype=torch.float64)
    L = 0.5 * torch.randn(n * k, r, generator=g, dtype=torch.float64)
    blocks = B @ B.transpose(1, 2) + torch.einsum("nkr,nlr->nkl", L.reshape(n, k, r), L.reshape(n, k, r))
    inverse = NystromInverse(blocks, L, 1e-14)
    dense = torch.linalg.inv(torch.block_diag(*(B @ B.transpose(1, 2))) + L @ L.T)
    rows = torch.tensor([3, 4, 5, 9, 10, 11])
    assert torch.allclose(inverse.block(rows), dense[rows][:, rows], atol=1e-10)
    U = torch.randn(2, n * k, generator=g, dtype=torch.float64)
    assert torch.allclose(inverse.apply(U), U @ dense, atol=1e-10)


def test_nystrom_scan_where_it_is_meant_to_work_and_where_it_is_not():
    """Measured, and stated in NystromInverse's docstring: close on a low-rank coupling plus independent parts,
    far off where the points' gradients are nearly dependent."""
    good, bad = _sketchable_problem(), _dependent_problem()
    errors = {}
    for name, problem in (("good", good), ("bad", bad)):
        exact = scan(problem, GramFactor(problem, path="dense")).kappa
        sketch = GramFactor(problem, path="nystrom", rank=10, power=1)
        assert sketch.plan.path == "nystrom" and sketch.G is None and sketch.gram_inverse.approximate
        approx = scan(problem, sketch, refine=0).kappa
        top = exact.argsort(descending=True)[:10]
        errors[name] = (spearman(approx, exact), float(((approx - exact).abs() / exact)[top].max()))
    assert errors["good"][0] > 0.8 and errors["good"][1] < 0.15
    assert errors["bad"][1] > 0.5  # the docstring's warning is real


def test_refined_points_get_the_exact_block_and_modulus():
    """The sketch's top points solved exactly by Nyström-preconditioned CG: their blocks of (GGᵀ)⁺ (each alone and
    together) and κ_k as the dense factor's; the others untouched."""
    problem = _sketchable_problem()
    dense = GramFactor(problem, path="dense")
    exact = scan(problem, dense).kappa
    alone = scan(problem, GramFactor(problem, path="nystrom", rank=10), refine=0).kappa
    sketch = GramFactor(problem, path="nystrom", rank=10)
    refined = scan(problem, sketch, refine=8, rounds=1, sample=0)
    points = refined.exact_points
    assert points.tolist() == alone.argsort(descending=True)[:8].sort().values.tolist()
    assert refined.refine_error <= REFINE_TOL
    assert torch.allclose(refined.kappa[points], exact[points], rtol=0.02)
    assert not torch.allclose(alone[points], exact[points], rtol=0.02)
    others = torch.ones(problem.n, dtype=torch.bool)
    others[points] = False
    assert torch.equal(refined.kappa[others], alone[others])
    sketch.refine(points, tol=0)
    assert torch.equal(sketch.exact_points, points) and len(dense.exact_points) == problem.n
    assert torch.allclose(sketch.block(points[:3]), dense.block(points[:3]), rtol=1e-6, atol=1e-8)
    pair = points[[0, -1]]  # the coupling between refined points is exact too
    assert group_modulus(problem, pair, sketch)[0] == pytest.approx(group_modulus(problem, pair, dense)[0], rel=1e-6)


def test_later_rounds_find_the_top_points_the_sketch_underrates():
    """A rank-5 sketch places two of the exact top 3 outside its top 5 (it underrates them by up to 70 %, the others
    by 5 %): refining its top 5 alone misses them and, with no random sample, the rule sees nothing wrong; the
    sample's ratios name them (``unresolved`` after one round), and a second round makes them exact."""
    problem = _sketchable_problem()
    exact = scan(problem, GramFactor(problem, path="dense")).kappa
    top = exact.argsort(descending=True)[:3]
    first = scan(problem, GramFactor(problem, path="nystrom", rank=5), refine=0).ranking[:5]
    missed = set(top.tolist()) - set(first.tolist())
    assert len(missed) == 2
    blind = scan(problem, GramFactor(problem, path="nystrom", rank=5), refine=5, top=3, sample=0)
    assert blind.exact_points.tolist() == first.sort().values.tolist() and len(blind.unresolved) == 0
    one = scan(problem, GramFactor(problem, path="nystrom", rank=5), refine=5, top=3, sample=3, rounds=1)
    assert missed <= set(one.unresolved.tolist()) and not missed & set(one.exact_points.tolist())
    found = scan(problem, GramFactor(problem, path="nystrom", rank=5), refine=5, top=3, sample=3)
    assert set(top.tolist()) <= set(found.exact_points.tolist()) and len(found.unresolved) == 0
    assert found.refine_error <= REFINE_TOL and torch.equal(found.ranking[:3], top)
    assert torch.allclose(found.kappa[top], exact[top], rtol=0.01)


def test_refinements_accumulate_with_their_coupling():
    """Two refinements of disjoint points, then one of points from both: every block within all of them is the dense
    factor's, the coupling across refinements included (one taken from the other's columns would be wrong)."""
    problem = _sketchable_problem()
    dense = GramFactor(problem, path="dense")
    sketch = GramFactor(problem, path="nystrom", rank=5)
    a, b, again = torch.tensor([3, 11, 20]), torch.tensor([0, 7]), torch.tensor([7, 20])
    union = torch.tensor([0, 3, 7, 11, 20])
    for points in (a, b):
        assert sketch.refine(points, tol=0) == 0
    assert torch.equal(sketch.exact_points, union)
    assert torch.allclose(sketch.block(union), dense.block(union), rtol=1e-6, atol=1e-8)
    assert sketch.refine(again, tol=0) == 0
    assert torch.equal(sketch.exact_points, union)
    assert torch.allclose(sketch.block(union), dense.block(union), rtol=1e-6, atol=1e-8)
    assert not torch.allclose(GramFactor(problem, path="nystrom", rank=5).block(union), dense.block(union), rtol=1e-2)


def test_block_cg_searches_every_column_s_directions():
    """c columns add c dimensions of Krylov space per iteration: on a 60 × 60 matrix of condition 1e4, 12 columns are
    solved to 1e-10 in 8 iterations (60 / 12 = 5 in exact arithmetic: 2e-5 after 5), unpreconditioned, to the dense
    solve, where one column alone is still above 1e-10 after 100; a semi-definite matrix with the columns in its range gives the pseudo-inverse's answer."""
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64))[0]
    A = Q @ torch.diag(torch.logspace(0, 4, 60, dtype=torch.float64)) @ Q.T
    B = torch.randn(60, 12, generator=g, dtype=torch.float64)
    X, residual, done = block_pcg(lambda D: A @ D, lambda R: R, B, 1e-10, 100)[:3]
    assert residual < 1e-10 and done <= 8 and torch.allclose(X, torch.linalg.solve(A, B), rtol=1e-8)
    assert block_pcg(lambda D: A @ D, lambda R: R, B[:, :1], 1e-10, 100)[1] > 1e-10
    S = Q[:, :40] @ torch.diag(torch.logspace(0, 4, 40, dtype=torch.float64)) @ Q[:, :40].T  # rank 40
    B = S @ B
    X, residual, done = block_pcg(lambda D: S @ D, lambda R: R, B, 1e-10, 100)[:3]
    assert residual < 1e-10 and torch.allclose(X, torch.linalg.pinv(S) @ B, rtol=1e-6, atol=1e-10)


def test_block_cg_iterates_bound_the_inverse_from_below_and_grow():
    """With X₀ = 0 each iterate is a Galerkin solution: ``BᵀX_j`` grows with j (Loewner order), stays below
    ``BᵀA⁺B``, and falls short of it by exactly ``R_jᵀA⁺R_j`` — why a loosely refined κ is a lower bound."""
    g = torch.Generator().manual_seed(1)
    Q = torch.linalg.qr(torch.randn(80, 80, generator=g, dtype=torch.float64))[0]
    S = Q[:, :50] @ torch.diag(torch.logspace(0, 5, 50, dtype=torch.float64)) @ Q[:, :50].T  # PSD, rank 50
    B = S @ torch.randn(80, 6, generator=g, dtype=torch.float64)
    pinv = torch.linalg.pinv(S, hermitian=True)
    exact = B.T @ pinv @ B
    diagonal = S.diagonal().clamp(min=1e-12)
    previous = torch.zeros(6, 6, dtype=torch.float64)
    for j in range(1, 6):
        X, residual, done = block_pcg(lambda D: S @ D, lambda R: R / diagonal[:, None], B, 0.0, j)[:3]
        assert done == j and residual > 1e-6  # not converged: the bound is about partial solves
        now = B.T @ X
        R = B - S @ X
        assert torch.allclose(exact - now, R.T @ pinv @ R, atol=1e-8 * float(exact.norm()))
        assert float(torch.linalg.eigvalsh(exact - now).min()) > -1e-8 * float(exact.norm())
        assert float(torch.linalg.eigvalsh(now - previous).min()) > -1e-8 * float(exact.norm())
        previous = now


def test_block_cg_recycles_an_earlier_solve_s_directions():
    """A second solve with the same matrix, given the first's directions (``basis``), reaches the same solution to
    1e-10 in fewer iterations (16 against 55 here), its iterates still Galerkin solutions (below ``BᵀA⁺B``, growing,
    short of it by ``RᵀA⁺R``), the directions it keeps spanning the first's too; a resumed solve keeps what it had
    kept.  Without making the basis A-orthonormal again (rounding had cost it that) the recycled solve stalled at
    residual 3e-10 with a 6-iteration basis and at 1e-2 with a 10-iteration one."""
    g = torch.Generator().manual_seed(4)
    Q = torch.linalg.qr(torch.randn(120, 120, generator=g, dtype=torch.float64))[0]
    S = Q[:, :100] @ torch.diag(torch.logspace(0, 5, 100, dtype=torch.float64)) @ Q[:, :100].T  # PSD, rank 100
    first, second = (S @ torch.randn(120, 6, generator=g, dtype=torch.float64) for _ in range(2))
    diagonal = S.diagonal().clamp(min=1e-12)
    solve = lambda B, **kw: block_pcg(lambda D: S @ D, lambda R: R / diagonal[:, None], B,  # noqa: E731
                                      kw.pop("rtol", 1e-10), kw.pop("maxiter", 100), **kw)
    earlier = solve(first, maxiter=6, keep=120)
    V, AV = earlier.basis
    assert V.shape == (120, 36) and torch.allclose(AV, S @ V, atol=1e-9 * float(AV.abs().max()))
    assert torch.allclose(V.T @ AV, torch.eye(36, dtype=torch.float64), atol=1e-8)
    plain, recycled = solve(second), solve(second, basis=earlier.basis, keep=120)
    pinv = torch.linalg.pinv(S, hermitian=True)
    assert plain.residual < 1e-10 and recycled.residual < 1e-10
    assert recycled.iterations < plain.iterations / 2
    exact = second.T @ pinv @ second  # what the refinement reads from X (X itself may leave S's range: P does)
    assert torch.allclose(second.T @ recycled.X, exact, rtol=1e-8, atol=1e-12 * float(exact.abs().max()))
    # keep bounds what is held: the earliest directions, still a basis that serves (fewer iterations, same solution)
    capped = solve(first, maxiter=6, keep=10)
    assert capped.basis[0].shape == (120, 10) and torch.equal(capped.basis[0], earlier.basis[0][:, :10])
    partly = solve(second, basis=capped.basis, keep=12)
    assert partly.basis[0].shape[1] == 12 and partly.residual < 1e-10
    assert recycled.iterations < partly.iterations < plain.iterations
    assert torch.allclose(second.T @ partly.X, exact, rtol=1e-8, atol=1e-12 * float(exact.abs().max()))
    W = recycled.basis[0]
    first = W[:, :36]  # the earlier directions, A-orthonormal again, then this solve's
    assert W.shape[1] > 36 and torch.allclose(first.T @ S @ first, torch.eye(36, dtype=torch.float64), atol=1e-8)
    assert torch.allclose(S @ first @ (first.T @ S @ V), S @ V, atol=1e-8 * float((S @ V).abs().max()))
    previous = second.T @ earlier.basis[0] @ earlier.basis[0].T @ second
    for j in range(1, 4):
        X = solve(second, rtol=0.0, maxiter=j, basis=earlier.basis).X
        now, R = second.T @ X, second - S @ X
        assert torch.allclose(exact - now, R.T @ pinv @ R, atol=1e-8 * float(exact.norm()))
        assert float(torch.linalg.eigvalsh(exact - now).min()) > -1e-8 * float(exact.norm())
        assert float(torch.linalg.eigvalsh(now - previous).min()) > -1e-8 * float(exact.norm())
        previous = now
    states = []
    solve(second, maxiter=2, basis=earlier.basis, keep=120, saved=states.append)
    again = solve(second, state=states[-1], basis=earlier.basis, keep=120)
    assert again.iterations == recycled.iterations and torch.allclose(again.basis[0], W, atol=1e-12)


def test_a_refinement_recycles_the_directions_of_those_before_it():
    """The scan's second round starts from the first's directions: its blocks equal the dense pseudo-inverse's
    (``tol=0``) in fewer iterations than a factor that had not refined before."""
    problem = _sketchable_problem(n=60, k=5)
    dense = GramFactor(problem, path="dense")
    first, second = torch.arange(0, 60, 10), torch.arange(5, 60, 10)
    counts = {}
    for name, earlier in (("recycled", first), ("fresh", None)):
        factor = GramFactor(problem, path="nystrom", rank=8)
        if earlier is not None:
            assert factor.refine(earlier) <= REFINE_TOL and factor._searched is not None
        seen = []
        assert factor.refine(second, tol=0, progress=seen.append) == 0
        counts[name] = len(seen)
        assert torch.allclose(factor.block(second), dense.block(second), rtol=1e-8, atol=1e-12)
    assert counts["recycled"] < counts["fresh"]
    # the directions count against the memory budget: with none left beside the plan's estimate none are kept
    itemsize = torch.finfo(problem.dtype).bits // 8
    tight = plan(problem.n, 5, problem.p, itemsize, memory=10**9, path="nystrom", rank=8).bytes
    factor = GramFactor(problem, path="nystrom", rank=8, memory=tight)
    assert factor.recycled_directions == 0 and factor.refine(first) <= REFINE_TOL and factor._searched is None
    assert factor.refine(second, tol=0) == 0
    assert torch.allclose(factor.block(second), dense.block(second), rtol=1e-8, atol=1e-12)
    roomy = GramFactor(problem, path="nystrom", rank=8, memory=tight + 2 * 300 * 8 * 7)
    assert roomy.recycled_directions == 7
    roomy.refine(first)
    assert roomy._searched[0].shape[1] == 7


def test_relative_rise_bounds_every_kappa_s_rise_and_is_attained():
    """``relative_rise(B, A)`` bounds ``1 − σ_max(B^½M) / σ_max(A^½M)`` for every M and some M attains it."""
    g = torch.Generator().manual_seed(2)
    F = torch.randn(4, 5, 3, generator=g, dtype=torch.float64)
    A = F @ F.transpose(1, 2)  # rank 3 of 5: the bound lives on A's range
    B = A - 0.3 * (F[..., :1] @ F[..., :1].transpose(1, 2))  # 0 ⪯ B ⪯ A
    rise = relative_rise(B, A)

    def kappa(X, M):
        lam, U = torch.linalg.eigh(X)
        return torch.linalg.matrix_norm((U * lam.clamp(min=0).sqrt()[:, None, :]) @ U.transpose(1, 2) @ M, ord=2)

    worst = torch.zeros(4, dtype=torch.float64)
    for _ in range(2000):
        M = torch.randn(4, 5, 2, generator=g, dtype=torch.float64)
        worst = torch.maximum(worst, 1 - kappa(B, M) / kappa(A, M))
    assert bool((worst <= rise + 1e-12).all()) and bool((worst > 0.9 * rise).all())
    assert bool((rise > 0.01).all()) and torch.allclose(relative_rise(A, A), torch.zeros(4, dtype=torch.float64),
                                                        atol=1e-12)
    assert torch.allclose(relative_rise(0 * A, A), torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("n, k, rank, points", [(30, 3, 10, 8), (60, 5, 8, 12)])
def test_the_refinement_s_error_estimate_is_above_the_true_error(n, k, rank, points):
    """Refined at a loose tolerance, κ lies below the exact κ (block CG's Galerkin bound) by less than the estimate
    the scan reports, and not by nothing (the refinement stopped before it was exact); at 1e-8 it equals it."""
    problem = _sketchable_problem(n=n, k=k)
    exact = scan(problem, GramFactor(problem, path="dense")).kappa
    options = dict(refine=points, rounds=1, sample=0)
    for tol in (0.05, 0.01, 1e-3):
        loose = scan(problem, GramFactor(problem, path="nystrom", rank=rank), tol=tol, **options)
        chosen = loose.exact_points
        shortfall = (exact[chosen] - loose.kappa[chosen]) / exact[chosen]
        assert len(chosen) == points and 0 < loose.refine_error <= tol
        assert bool((shortfall > -1e-9).all()) and float(shortfall.max()) <= loose.refine_error
        if tol == 0.05:
            assert float(shortfall.max()) > 1e-5  # stopped short of exact
    tight = scan(problem, GramFactor(problem, path="nystrom", rank=rank), tol=1e-8, **options)
    assert torch.allclose(tight.kappa[tight.exact_points], exact[tight.exact_points], rtol=1e-6)


def test_block_cg_stops_on_the_caller_s_error_estimate():
    """``error`` and ``tol`` stop block CG before its residual does, and its memory carries over a resumed solve.
    Unpreconditioned on condition 1e3 the rises do not shrink steadily and :func:`block_error` falls short of the
    true error (2.3× here): an estimate, not a bound (the scan's preconditioned solves, measured, stay above)."""
    g = torch.Generator().manual_seed(3)
    Q = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64))[0]
    A = Q @ torch.diag(torch.logspace(0, 3, 60, dtype=torch.float64)) @ Q.T
    B = torch.randn(60, 4, generator=g, dtype=torch.float64)
    exact = B.T @ torch.linalg.solve(A, B)
    calls = []

    def error(X, memory):
        calls.append(len(memory))
        return block_error((B.T @ X)[None], memory)

    solve = block_pcg(lambda D: A @ D, lambda R: R, B, 1e-12, 100, error=error, tol=1e-3)
    plain = block_pcg(lambda D: A @ D, lambda R: R, B, 1e-12, 100)
    assert solve.residual > 1e-6 and 3 <= solve.iterations < plain.iterations and calls[:3] == [0, 1, 2]
    now = relative_rise((B.T @ solve.X)[None], exact[None])
    assert solve.error <= 1e-3 and solve.error < float(now) < 3 * solve.error
    states = []
    block_pcg(lambda D: A @ D, lambda R: R, B, 1e-12, 4, saved=states.append, error=error)
    again = block_pcg(lambda D: A @ D, lambda R: R, B, 1e-12, 100, states[-1], error=error, tol=1e-3)
    assert again.iterations == solve.iterations and torch.allclose(again.X, solve.X, rtol=1e-10)


def test_a_refinement_that_does_not_converge_is_not_taken():
    """Where GGᵀ is too ill-conditioned for the solve (100 points with nearly dependent gradients: condition 8e11),
    the refinement does not reach its residual within the scan's iterations: the scan keeps the sketch's κ, far off
    there, and names the points it did not refine.  On 30 such points (condition 5e6) block CG refines them in the
    scan (per-column CG needed 111 iterations at rank 10, more than the scan's 50), and given the iterations the
    refinement is exact."""
    for n, converges in ((100, False), (30, True)):
        problem = _dependent_problem(n=n)
        exact = scan(problem, GramFactor(problem, path="dense")).kappa
        sketch = GramFactor(problem, path="nystrom", rank=10)
        result = scan(problem, sketch, refine=8)
        points = result.ranking[:8]
        alone = scan(problem, GramFactor(problem, path="nystrom", rank=10), refine=0).kappa
        assert float(((alone[points] - exact[points]).abs() / exact[points]).max()) > 0.5  # the sketch's
        if not converges:
            assert len(result.exact_points) == 0 and result.refine_error > REFINE_TOL
            assert sketch.gram_inverse.exact is None and torch.equal(result.kappa, alone)
            assert set(points.tolist()) <= set(result.unresolved.tolist())  # named, not refined
            continue
        assert result.refine_error <= REFINE_TOL and set(points.tolist()) <= set(result.exact_points.tolist())
        assert sketch.refine(points, tol=0, maxiter=300) == 0
        kappa = torch.tensor([group_modulus(problem, [k], sketch)[0] for k in points.tolist()])
        assert torch.allclose(kappa.to(exact), exact[points], rtol=1e-6)


def spearman(a, b):
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])
