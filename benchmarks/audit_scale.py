"""The poisoning audit's scan at ResNet scale: time and peak memory against n, the streamed (exact) Gram
factor against the dense one where G fits, the Nyström (approximate) factor against the exact one — the sketch
alone and after the scan's refinement of its top points (``exact_points``, solved by preconditioned CG).

    python benchmarks/audit_scale.py --sizes 250,500,1000 --exact 200                 # exact paths
    python benchmarks/audit_scale.py --sizes 250,500,1000,2000 --exact 0 --path nystrom --rank 500
    python benchmarks/audit_scale.py --sizes 250,500,1000,2000,4000 --exact 0 --path nystrom --rank 500 \
        --refine-iterations 1                                                          # the cost curve
    python benchmarks/audit_scale.py --sizes 250,500 --exact 0 --peer trak         # a peer's scan beside ours

Rows are merged into the JSON file (one per role, path and n); a size already measured (its state file) is
reused, and an interrupted one resumes from its factor's checkpoint (``GramFactor(checkpoint=…)``) — its row then
says ``"resumed": true`` and its seconds add up the stretches: each stretch's time up to its last progress event (a
panel, a Jacobian pass of the sketch or a CG iteration, each saved when reported; a clock file beside the
checkpoint) plus the last stretch, so what an interruption loses is counted once (within one Jacobian pass of the
sketch, whose checkpoint is saved every second pass and when it is finished).  A row resumed without that clock
(``"seconds_whole": false``: its seconds are the last stretch's only) is left out of ``time_exponent``.
Each size runs in its own process (so its peak resident memory is its own): the shared ResNet-56 on the
first n shared CIFAR-10 training images — beyond the 1000 shared images, horizontally flipped and
randomly shifted copies of them (timing only; said in the output) — and ``Audit(problem).scan()`` with
the factor path the memory plan picks.  An exact (CPU) row also writes its κ beside the JSON
(``kappa-exact-<n>.json``, committed with it): the reference of a later ``--path nystrom`` row of the same n.  At
``--exact`` images the dense factor (G held) is the reference
of the streamed one: Spearman of κ and the largest relative error on the top 20.  ``time_exponent`` is
the log–log slope of the scan's seconds against n (Nyström rows without a refinement; ``time_exponent_refined``
with ``scan``'s rounds, ``time_exponent_exact`` the streamed rows).  ``--refine-iterations m`` times the sketch-only
scan and then m CG iterations of a first refinement round of ``scan``'s size (110·K columns; not taken):
``refine_iteration_seconds``, with its own exponent — the cost curve where a whole refinement does not fit a
session.  The figure ``audit_scale.png`` beside the JSON plots them all.

``--peer trak`` times a maintained peer's per-training-point scan on the same model and the same n images,
each size right after ours, in its own process (its wall seconds and peak RSS: ``peer_seconds``,
``peer_peak_rss_bytes``; ``peer_seconds_over_ours`` > 1: ours is faster): dattri 0.3.0's TRAK
(``dattri.algorithm.trak.TRAKAttributor``; ``pip install --no-deps dattri==0.3.0``, see ``pyproject.toml``'s
``bench``) with its defaults on CPU — a normal random projection to 512 dimensions, one checkpoint, no
regularisation — float32, batches of 20 like ours, scoring every one of the n points by its self-influence
(``self_attribute``: the TRAK score of a point on its own loss, the usual per-point scan for mislabelled or
poisoned points; no test queries, like ours).  The whole of it is timed: per-sample loss gradients, their
projection, the kernel solve and the scores.  TRAK answers a different question (how removing a point changes
a loss, not κ_k, how far the trained weights move when the point's input moves), so the two are compared for
cost only (``peer_note`` in each row).  With n under 512 the projected kernel is rank-deficient and dattri's
unregularised solve makes its scores unreliable; that does not change the cost.  A missing peer is reported,
not fatal.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from setsens.atomic import atomic_write
from setsens.report import write_json, write_text

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def images(n: int, seed: int = 0):
    """The first n shared training images; past 1000, flipped and shifted copies (for timing)."""
    from setsens.data.cifar import load_cifar10_npz

    x, y = load_cifar10_npz(DATA / "cifar10-subset.npz")
    g = torch.Generator().manual_seed(seed)
    xs, ys = [x], [y]
    while sum(len(a) for a in xs) < n:
        flipped = x.flip(-1)
        dx, dy = torch.randint(-4, 5, (2,), generator=g).tolist()
        xs.append(torch.roll(flipped, shifts=(dy, dx), dims=(-2, -1)))
        ys.append(y)
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


def one(n: int, path: str, memory: int, out: str, rank: int = 1000, device: str = "cpu",
        refine_iterations: int | None = None) -> None:
    """Scan n images on ``path`` in this process; write seconds, peak RSS (and on a GPU its peak memory) and κ to
    ``out`` (torch file).  ``refine_iterations`` (Nyström only): time the sketch-only scan, then that many CG
    iterations of a first refinement round (its 110·K columns), instead of ``scan``'s rounds."""
    from setsens.audit import REFINE_POINTS, REFINE_SAMPLE, GramFactor, scan
    from setsens.models.resnet import load_cifar_resnet
    from setsens.problem import Problem, cross_entropy

    model = load_cifar_resnet(DATA / "resnet56-cifar10.th", 56)
    problem = Problem(model, cross_entropy, images(n), batch_size=20, device=device)
    state = Path(out).with_suffix(".state")  # the factor's resumable state: an interrupted size picks up there
    clock = Path(out).with_suffix(".clock")  # the earlier stretches' seconds, as of their last progress event
    resumed = any(state.parent.glob(state.name + "*"))
    earlier = float(clock.read_text()) if resumed and clock.is_file() else 0.0
    t0, untimed, refined_at = time.perf_counter(), 0.0, []

    def progress(event) -> None:
        seconds = earlier + time.perf_counter() - t0 - untimed
        if event.stage == "refine":
            refined_at.append(time.perf_counter())
        clock.with_suffix(".tmp").write_text(repr(seconds))
        clock.with_suffix(".tmp").replace(clock)
        print(f"  n={n}: {event.stage} {event.done}/{event.total}, {seconds:.0f} s"
              + (f", residual {event.info['residual']:.2g}" if "residual" in event.info else "")
              + (f", estimated κ error {event.info['error']:.2g}" if "error" in event.info else ""), flush=True)

    factor = GramFactor(problem, path=path, memory=memory, rank=rank, checkpoint=str(state), progress=progress)
    sketch, iteration = None, None
    if refine_iterations is not None and factor.gram_inverse.approximate:
        result = scan(problem, factor, refine=0)
        seconds = earlier + time.perf_counter() - t0
        # the cost of a CG iteration depends on the number of columns, not on which points: the sketch's top 110
        start = time.perf_counter()
        factor.refine(result.ranking[:REFINE_POINTS + REFINE_SAMPLE].sort().values, maxiter=refine_iterations,
                      progress=progress)
        if refined_at:  # none when a resumed run had already done them (then not timed)
            iteration = (refined_at[-1] - start) / len(refined_at)
    else:
        if factor.gram_inverse.approximate:  # κ before the refinement, for the table (not timed)
            start = time.perf_counter()
            sketch = scan(problem, factor, refine=0).kappa
            untimed = time.perf_counter() - start
        result = scan(problem, factor, progress=progress)
        seconds = earlier + time.perf_counter() - t0 - untimed
    torch.save({"n": n, "p": problem.p, "K": factor.k, "path": factor.plan.path, "panel": factor.plan.panel,
                "sketch_rank": factor.plan.rank, "seconds": seconds, "factor_seconds": factor.seconds,
                "rank": factor.rank, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "kappa": result.kappa, "kappa_sketch": sketch, "exact_points": result.exact_points,
                "refine_error": result.refine_error, "resumed": resumed,
                "refined": refine_iterations is None and factor.gram_inverse.approximate,
                "refine_iteration_seconds": iteration,
                "refine_columns": min(REFINE_POINTS + REFINE_SAMPLE, n) * factor.k if iteration else None,
                "seconds_whole": not resumed or clock.is_file(), "device": str(problem.device),
                "peak_device_bytes": torch.cuda.max_memory_allocated() if problem.device.type == "cuda" else None}, out)


PEERS = {"trak": "dattri 0.3.0 TRAK (TRAKAttributor.self_attribute)"}
PEER_SETTINGS = {"trak": "self-influence of each of the n points (no test queries), dattri defaults on CPU: normal "
                         "projection to 512 dimensions, 1 checkpoint, regularization 0; float32, batches of 20, "
                         "per-sample loss gradients of all p parameters; fit and scores timed together"}
PEER_NOTE = ("a different question (TRAK: the effect of removing a training point on a loss; ours: κ_k, how far "
             "the trained weights move per unit move of the point's input) — compared for cost only, on the same "
             "model, images, threads and run")


def peer_one(n: int, peer: str, out: str) -> None:
    """The peer's per-point scan of n images in this process; write seconds, peak RSS and scores to ``out``."""
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask

    from setsens.models.resnet import load_cifar_resnet

    assert peer == "trak", peer
    model = load_cifar_resnet(DATA / "resnet56-cifar10.th", 56)
    x, y = images(n)
    ce = torch.nn.functional.cross_entropy

    def margin(params, data):  # TRAK's model output: the log-odds of the correct class
        image, label = data
        logp = -ce(torch.func.functional_call(model, params, image.unsqueeze(0)), label.unsqueeze(0))
        return logp - torch.log1p(-torch.exp(logp))

    def correct(params, data):  # the probability of the correct class
        image, label = data
        return torch.exp(-ce(torch.func.functional_call(model, params, image.unsqueeze(0)), label.unsqueeze(0)))

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=20, shuffle=False)
    t0 = time.perf_counter()
    task = AttributionTask(loss_func=margin, model=model, checkpoints=model.state_dict())
    scores = TRAKAttributor(task=task, correct_probability_func=correct, device="cpu").self_attribute(loader)
    seconds = time.perf_counter() - t0
    torch.save({"n": n, "peer": PEERS[peer], "seconds": seconds,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "scores": scores.flatten()}, out)


def run_peer(n: int, peer: str, tmp: Path) -> dict | None:
    """The peer's scan of n images in its own process (reused from its state file), None if it is not installed."""
    import importlib.util
    import os

    if importlib.util.find_spec("dattri") is None:
        print(f"  peer {peer}: dattri is not installed (pip install --no-deps dattri==0.3.0) — skipped", flush=True)
        return None
    out = tmp / f"peer-{peer}-{n}.pt"
    if not out.is_file():
        subprocess.run([sys.executable, __file__, "--one", str(n), "--peer", peer, "--out", str(out)], check=True,
                       env={**os.environ, "TQDM_DISABLE": "1"})
    return torch.load(out, weights_only=True)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def top20_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    top = exact.argsort(descending=True)[:20]
    return float(((approx[top] - exact[top]).abs() / exact[top]).max())


def exact_file(folder: Path, n: int) -> Path:
    """The committed exact κ of the first n images: the reference of a later Nyström row or refinement check."""
    return folder / f"kappa-exact-{n}.json"


def save_exact(folder: Path, n: int, kappa: torch.Tensor, seconds: float) -> None:
    write_text(exact_file(folder, n), json.dumps({"model": "resnet56", "n": n, "threads": torch.get_num_threads(),
                                                 "seconds": seconds, "kappa": kappa.tolist()}) + "\n")


def load_exact(folder: Path, n: int) -> dict | None:
    file = exact_file(folder, n)
    if not file.is_file():
        return None
    saved = json.loads(file.read_text())
    return {**saved, "kappa": torch.tensor(saved["kappa"], dtype=torch.float64)}


def run(n: int, path: str, memory: int, tmp: Path, rank: int = 1000, device: str = "cpu",
        refine_iterations: int | None = None) -> dict:
    name = f"scan-{n}-{path}" + (f"-{device.replace(':', '')}" if device != "cpu" else "") + (
        f"-cg{refine_iterations}" if refine_iterations is not None else "")
    out = tmp / f"{name}.pt"
    if not out.is_file():  # a rerun reuses the sizes already measured
        subprocess.run([sys.executable, __file__, "--one", str(n), "--path", path, "--memory", str(memory / 1e9),
                        "--out", str(out), "--rank", str(rank), "--device", device]
                       + (["--refine-iterations", str(refine_iterations)] if refine_iterations is not None else []),
                       check=True)
    return torch.load(out, weights_only=True)


def exponent(rows: list[dict], seconds: str = "seconds") -> float | None:
    """The log–log slope of ``seconds`` against n (least squares), None under two sizes."""
    timed = sorted({(row["n"], row[seconds]) for row in rows
                    if row.get(seconds) and row.get("seconds_whole", not row.get("resumed"))})
    if len(timed) < 2:
        return None
    xs, ys = [math.log(n) for n, _ in timed], [math.log(s) for _, s in timed]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)


def plot(record: dict, file: Path) -> None:
    """Seconds against n on log–log axes: each scan path, a CG iteration of the refinement, the peer."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    scans = [row for row in record["runs"] if row.get("role", "scan") == "scan" and row.get("device", "cpu") == "cpu"]
    streamed, nystrom = ([r for r in scans if r["path"] == path] for path in ("streamed", "nystrom"))
    loaded = ", n = " + " / ".join(str(r["n"]) for r in streamed if r.get("load")) + " on loaded cores"
    series = {"exact (streamed Gram)" + (loaded if any(r.get("load") for r in streamed) else ""): (streamed, "seconds"),
              "Nyström sketch, scan without refinement": ([r for r in nystrom if not r.get("refined")], "seconds"),
              "Nyström sketch + refinement": ([r for r in nystrom if r.get("refined")], "seconds"),
              "one CG iteration of the refinement": (scans, "refine_iteration_seconds"),
              "peer: dattri TRAK self-influence": (scans, "peer_seconds")}
    for label, (rows, key) in series.items():
        points = sorted((r["n"], r[key]) for r in rows if r.get(key))
        if points:
            ax.loglog(*zip(*points), "o-", label=label)
    ax.set_xlabel("training images n (beyond 1000: flipped/shifted copies)")
    ax.set_ylabel("seconds (2 CPU threads)")
    slopes = ", ".join(f"{name} {record[key]:.2f}" for name, key in
                       (("sketch", "time_exponent"), ("refined", "time_exponent_refined")) if record.get(key))
    ax.set_title("ResNet-56 audit scan, p = 853 018, K = 10" + (f"; log–log slope: {slopes}" if slopes else ""),
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(file, lambda fh: fig.savefig(fh, format="png", dpi=120))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="250,500,1000")
    parser.add_argument("--exact", type=int, default=200, help="n at which the dense factor is the reference")
    parser.add_argument("--memory", type=float, default=12.0, help="GB the scan may hold")
    parser.add_argument("--json", default=str(ROOT / "docs/runs/audit-scale/audit_scale.json"))
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--path", default="auto", choices=["auto", "streamed", "nystrom", "dense"],
                        help="the factor's path for --sizes (nystrom rows are compared with the exact κ of a previous "
                             "auto run on the same sizes, kappa-exact-<n>.json beside --json)")
    parser.add_argument("--rank", type=int, default=1000, help="the Nyström sketch's rank")
    parser.add_argument("--peer", default="none", choices=["none", *PEERS],
                        help="also time this peer's per-point scan of the same images (cost only; see above)")
    parser.add_argument("--device", default="cpu", help="where the scan runs (cpu, cuda); the exact reference of a "
                        "nystrom row is the CPU auto run's")
    parser.add_argument("--refine-iterations", type=int, help="Nyström rows: time the sketch-only scan (the row's "
                        "seconds) and this many CG iterations of a first refinement round (refine_iteration_seconds), "
                        "not scan's rounds — the cost curve where a whole refinement does not fit the session")
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    memory = int(args.memory * 1e9)
    if args.one and args.peer != "none":
        return peer_one(args.one, args.peer, args.out)
    if args.one:
        return one(args.one, args.path, memory, args.out, args.rank, args.device, args.refine_iterations)
    folder = Path(args.json).parent
    tmp = folder / "state"
    tmp.mkdir(parents=True, exist_ok=True)
    rows = []
    if args.exact:
        print(f"n={args.exact}: dense factor (G held) against the streamed one…", flush=True)
        dense, streamed = run(args.exact, "dense", 10**12, tmp), run(args.exact, "streamed", memory, tmp)
        rows.append({"role": "dense check", "model": "resnet56", "n": args.exact, "p": streamed["p"],
                     "K": streamed["K"], "path": "streamed",
                     "seconds": streamed["seconds"], "peak_rss_bytes": streamed["peak_rss_bytes"],
                     "spearman_vs_exact": spearman(streamed["kappa"], dense["kappa"]),
                     "top20_max_relative_error": top20_error(streamed["kappa"], dense["kappa"]),
                     "exact_reference": f"dense factor (G held), {dense['seconds']:.0f} s, "
                                        f"{dense['peak_rss_bytes'] / 1e9:.1f} GB peak",
                     "peer": None, "peer_seconds": None})
    for n in [int(s) for s in args.sizes.split(",") if s]:
        print(f"n={n}, path {args.path}…", flush=True)
        r = run(n, args.path, memory, tmp, args.rank, args.device, args.refine_iterations)
        if r["path"] != "nystrom" and args.device == "cpu" and not exact_file(folder, n).is_file():
            save_exact(folder, n, r["kappa"], r["seconds"])
        against = load_exact(folder, n) if r["path"] == "nystrom" else None
        rows.append({"role": "scan", "model": "resnet56", "n": n, "p": r["p"], "K": r["K"], "path": r["path"],
                     "panel": r["panel"],
                     "sketch_rank": r.get("sketch_rank") or None, "seconds": r["seconds"],
                     "peak_rss_bytes": r["peak_rss_bytes"], "rank": r["rank"], "resumed": r.get("resumed", False),
                     "seconds_whole": r.get("seconds_whole", not r.get("resumed")),
                     **({"refined": r["refined"]} if r["path"] == "nystrom" else {}),
                     **({"refine_iteration_seconds": r["refine_iteration_seconds"],
                         "refine_columns": r["refine_columns"]} if r.get("refine_iteration_seconds") else {}),
                     **({"device": r["device"], "peak_device_bytes": r["peak_device_bytes"]}
                        if r.get("device", "cpu") != "cpu" else {}),
                     "data": "shared images" if n <= 1000 else "shared images + flipped/shifted copies (timing)",
                     "spearman_vs_exact": spearman(r["kappa"], against["kappa"]) if against else None,
                     "top20_max_relative_error": top20_error(r["kappa"], against["kappa"]) if against else None,
                     "exact_reference": (f"the streamed exact scan of the same images ({exact_file(folder, n).name})"
                                         if against else
                                         "the streamed factor is exact (equal to the dense one to rounding: "
                                         "tests/core/test_gram.py, and the row at n = --exact)"
                                         if r["path"] != "nystrom" else None),
                     "peer": None, "peer_seconds": None})
        if r.get("kappa_sketch") is not None:  # the sketch alone, and how many of the exact top 20 were refined
            rows[-1].update({"exact_points": len(r["exact_points"]),  # refine_residual: runs before the error estimate
                             **{k: r[k] for k in ("refine_error", "refine_residual") if k in r}})
            if against:
                top = set(against["kappa"].argsort(descending=True)[:20].tolist())
                rows[-1].update({"sketch_spearman_vs_exact": spearman(r["kappa_sketch"], against["kappa"]),
                                 "sketch_top20_max_relative_error": top20_error(r["kappa_sketch"], against["kappa"]),
                                 "exact_top20_refined": len(top & set(r["exact_points"].tolist()))})
        print(f"  {r['path']}: {r['seconds']:.0f} s, peak {r['peak_rss_bytes'] / 1e9:.1f} GB", flush=True)
        if args.peer != "none" and (q := run_peer(n, args.peer, tmp)) is not None:
            rows[-1].update({"peer": q["peer"], "peer_seconds": q["seconds"],
                             "peer_peak_rss_bytes": q["peak_rss_bytes"],
                             "peer_seconds_over_ours": q["seconds"] / r["seconds"],
                             "peer_settings": PEER_SETTINGS[args.peer], "peer_note": PEER_NOTE})
            print(f"  peer {args.peer}: {q['seconds']:.0f} s, peak {q['peak_rss_bytes'] / 1e9:.1f} GB", flush=True)
    old = json.loads(Path(args.json).read_text())["runs"] if Path(args.json).is_file() else []
    key = lambda row: (row.get("role", "scan"), row["path"], row["n"], row.get("device", "cpu"),  # noqa: E731
                       row.get("refined", False))
    new = {key(row) for row in rows}
    rows = sorted([row for row in old if key(row) not in new] + rows, key=key)
    scans = lambda path, device="cpu", refined=False: [  # noqa: E731
        row for row in rows if row.get("role", "scan") == "scan" and row["path"] == path
        and row.get("device", "cpu") == device and row.get("refined", False) == refined]
    record = {"time_exponent": exponent(scans("nystrom")), "time_exponent_exact": exponent(scans("streamed")),
              "time_exponent_refine_iteration": exponent(scans("nystrom"), "refine_iteration_seconds"),
              "time_exponent_refined": exponent(scans("nystrom", refined=True)),
              "threads": torch.get_num_threads(), "runs": rows}
    for device in sorted({row["device"] for row in rows if "device" in row}):
        record[f"time_exponent_{device}"] = exponent(scans("nystrom", device))
    write_json(args.json, record)
    plot(record, Path(args.json).with_suffix(".png"))
    print(json.dumps({k: v for k, v in record.items() if k != "runs"}), flush=True)


if __name__ == "__main__":
    main()
