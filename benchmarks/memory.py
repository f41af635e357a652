"""Peak memory (whole-process maximum resident set) and wall time of each setsens command.

Each command runs in a child process; ``os.wait4`` returns that child's resource usage, so the
figure is the command's own peak, not this script's.  Usage::

    python benchmarks/memory.py                 # toy, one-seed demo, quick presets
    python benchmarks/memory.py --full          # also the default demo (seeds 0-4)
    python benchmarks/memory.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

SETSENS = [sys.executable, "-m", "setsens"]


def commands(full: bool, out: str) -> dict[str, list[str]]:
    cmds = {
        "toy": ["toy", "--out", f"{out}/toy"],
        "demo --seeds 0": ["demo", "--seeds", "0", "--json", "--out", f"{out}/demo0"],
        "resnet --quick": ["resnet", "--quick", "--json", "--no-progress", "--out", f"{out}/resnet"],
        "weights --quick": ["weights", "--quick", "--json", "--out", f"{out}/weights"],
        "lipschitz --quick": ["lipschitz", "--quick", "--json", "--out", f"{out}/lipschitz"],
    }
    if full:
        cmds["demo (default, seeds 0-4)"] = ["demo", "--json", "--out", f"{out}/demo"]
    return cmds


def measure(args: list[str]) -> dict:
    """Run ``setsens args`` to completion; its exit code, peak resident set (MiB) and wall time (s)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(SETSENS + args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    return {"exit_code": os.waitstatus_to_exitcode(status), "peak_rss_mib": usage.ru_maxrss / 1024,
            "seconds": time.perf_counter() - t0}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="also the default demo (about 6 minutes on 2 cores)")
    parser.add_argument("--only", default=None, help="comma-separated command names to run")
    parser.add_argument("--json", action="store_true")
    a = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        cmds = commands(a.full, out)
        if a.only:
            cmds = {k: v for k, v in cmds.items() if k.split()[0] in a.only.split(",")}
        results = {}
        for name, args in cmds.items():
            results[name] = measure(args)
            if not a.json:
                r = results[name]
                print(f"{name:28s} peak {r['peak_rss_mib']:8.0f} MiB  {r['seconds']:7.1f} s  "
                      f"exit {r['exit_code']}", flush=True)
    if a.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
