"""The ResNet-56 budget attack over seeds: median, min and max of its headline figures.

Reads ``seed*/results.json`` beside this file (each a ``setsens audit ... --seed S --out seedS`` run; the command
is in docs/runs/README.md), and a certificate kept apart in ``certificate-seedS/results.json`` (from an earlier run
of that seed, or a run of its own: ``--certify`` without ``--attack``, whose reference settles its lr on moves as large
as its δ; its lr stated), and writes ``summary.json`` and ``summary.md`` here.
Run: ``.venv/bin/python docs/runs/audit-resnet56-budget-seeds/summarize.py``.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from setsens.experiments.seeds import distribution

here = Path(__file__).parent
runs = {int(p.parent.name.removeprefix("seed")): json.loads(p.read_text())
        for p in sorted(here.glob("seed*/results.json"))}
if not runs:
    raise SystemExit(f"no seed*/results.json under {here}")
seeds = sorted(runs)
budget = lambda r: r["attack"]["budgets"][0]  # noqa: E731  one budget per run
figures = {
    "flip_rate": {"attack": [budget(runs[s])["flip_rate"] for s in seeds],
                  **{k: [budget(runs[s])["baseline_flip_rate"][k] for s in seeds]
                     for k in ("random", "loss-gradient")}},
    "mean_margin_drop": {k: [budget(runs[s])["margin_drop"][k]["mean"] for s in seeds]
                         for k in ("attack", "random", "loss-gradient")},
    "margin_drop_over_best_baseline": [runs[s]["attack"]["margin_drop_over_best_baseline"] for s in seeds],
    "predicted_drop_median": [budget(runs[s])["predicted_drop_median"] for s in seeds],
    "reference_change_when_halved_median": [runs[s]["retraining"]["change_when_halved"]["median"] for s in seeds
                                            if "change_when_halved" in runs[s]["retraining"]],
}
summary = {"seeds": seeds, "budget": budget(runs[seeds[0]])["budget"],
           "targets": runs[seeds[0]]["attack"]["targets"], "retraining": runs[seeds[0]]["retraining"]["reference"],
           "lr_halvings": runs[seeds[0]]["retraining"].get("lr_halvings"),
           **{name: ({k: distribution(v) for k, v in f.items()} if isinstance(f, dict) else distribution(f))
              for name, f in figures.items()}}
summary["flipped_pooled"] = {k: round(sum(v) * summary["targets"]) for k, v in figures["flip_rate"].items()}
rows = [r for s in seeds for r in budget(runs[s])["targets"]]
# the reference only halves its lr, so a seed's largest is the one its attack followed (settled before it)
followed_lr = {s: max(r["lr"] for r in budget(runs[s])["targets"]) for s in seeds}
followed = [r for s in seeds for r in budget(runs[s])["targets"] if r["lr"] == followed_lr[s]]


def paired(rows):
    """Per target: how often the attack's drop exceeds the baseline's, and the median of their difference."""
    return {k: {"attack_drops_more": sum(r[k] > r["attack"] for r in rows), "of": len(rows),
                "median_difference": statistics.median((r[k] - r["attack"]) for r in rows)}
            for k in ("random", "loss-gradient")}


summary["paired"] = paired(rows)
if len(followed) < len(rows):  # runs before 731eef5 judged some targets at a smaller lr than their attack followed
    summary["paired_judged_at_the_followed_lr"] = paired(followed)
summary["judged_at"] = {s: {"lr": runs[s]["retraining"]["lr"], "lr_halvings": runs[s]["retraining"].get("lr_halvings"),
                            "targets_at_a_smaller_lr": sum(r["lr"] < lr for r in budget(runs[s])["targets"])}
                        for s, lr in followed_lr.items()}
# a certificate from a seed's run, or kept apart (certificate-seedS/, its lr stated)
certificates = {int(p.parent.name.removeprefix("certificate-seed")): json.loads(p.read_text())
                for p in sorted(here.glob("certificate-seed*/results.json"))}
certificates.update({s: runs[s] for s in seeds if "certificate" in runs[s]})
if certificates:
    summary["certificate"] = {s: {**r["certificate"], "lr": r["retraining"]["lr"]} for s, r in certificates.items()}
(here / "summary.json").write_text(json.dumps(summary, indent=1))

fmt = lambda d, f="{:.2f}": f"{f.format(d['median'])} [{f.format(d['min'])}, {f.format(d['max'])}]"  # noqa: E731
lines = [f"# ResNet-56 budget attack over seeds {seeds}",
         "",
         f"{summary['targets']} held-out targets a seed, 10 points, budget {100 * summary['budget']:g} % per point, "
         f"judged by the budget response ({runs[seeds[0]]['retraining']['steps']} steps of full-batch Nesterov SGD "
         "from w̄, perturbed minus clean) at the lrs listed below. Median [min, max] over seeds:",
         "",
         "| | attack (budget response) | random directions | own loss gradient |",
         "|---|---|---|---|",
         "| targets flipped | " + " | ".join(fmt(summary["flip_rate"][k], "{:.0%}")
                                          for k in ("attack", "random", "loss-gradient")) + " |",
         "| mean margin drop | " + " | ".join(fmt(summary["mean_margin_drop"][k])
                                           for k in ("attack", "random", "loss-gradient")) + " |",
         "| targets flipped, all seeds | " + " | ".join(f"{summary['flipped_pooled'][k]} of "
                                                       f"{summary['targets'] * len(seeds)}"
                                                       for k in ("attack", "random", "loss-gradient")) + " |",
         "",
         f"Attack's mean drop over the best baseline's: {fmt(summary['margin_drop_over_best_baseline'])}; "
         f"the reference's change when its budget was halved (median of each run): "
         f"{fmt(summary['reference_change_when_halved_median'], '{:.1%}')}.",
         "",
         *(f"Paired, per target ({which}): the attack's margin drop exceeds the random directions' on "
           f"{p['random']['attack_drops_more']} of {p['random']['of']} targets (median difference "
           f"{p['random']['median_difference']:.2f}), the own loss gradient's on "
           f"{p['loss-gradient']['attack_drops_more']} of {p['random']['of']} "
           f"({p['loss-gradient']['median_difference']:.2f})."
           for which, p in (("all seeds", summary["paired"]),
                            ("only those judged at the lr the attack followed",
                             summary.get("paired_judged_at_the_followed_lr"))) if p),
         "",
         "Judged at lr (halvings of 1/λ_max(H); targets judged at a smaller lr than the attack followed): "
         + "; ".join(f"seed {s}: {j['lr']:.3g} ({j['lr_halvings']}; {j['targets_at_a_smaller_lr']})"
                     for s, j in summary["judged_at"].items()) + "."]
for s, c in summary.get("certificate", {}).items():
    k = c["kinds"]["first order"]
    lines += ["", f"Seed {s}'s first-order certificate (of the budget response) against any {c['points']} poisoned "
              "points: certified " + ", ".join(f"{f:.0%} at δ = {100 * d:g} %" for d, f in
                                             zip(c["deltas"], k["certified_fraction"]))
              + f" of the held-out predictions (median radius {100 * k['radius']['median']:.2g} %); "
              f"{k['violations']} violations after attacking certified points and retraining; at lr {c['lr']:.3g}"
              + (f" ({c['passes']} passes: a check halved the lr)" if c.get("passes", 1) > 1 else "")
              + ("" if s in runs and "certificate" in runs[s] else f" (certificate-seed{s}/)")]
(here / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
