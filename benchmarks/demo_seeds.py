"""The default demo, run start to finish with several seeds in turn; prints one summary row per run and the
per-step curves (train reward and success, entropy, drift, dev success) as markdown, for BENCHMARKS.md.

    .venv/bin/python benchmarks/demo_seeds.py --seeds 0 1 2 3 4 [--root /tmp/demo-seeds] [-- --groups-per-step 8 ...]

Each run is `python -m advantage.tasks.tool_use.train --seed K --root ROOT/seed-K` (the whole command, model load
and both held-out evaluations included, timed from outside) with every other setting at its default (or as given after `--`, passed to every run).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def curves(run_dir: Path) -> str:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    dev = {r["step"]: r.get("dev/success") for r in rows if r.get("split") == "dev"}
    lines = ["| step | lr | train reward | train success | entropy | drift | lag | clip frac | grad norm | dev success |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if r.get("split") == "train" and r.get("skipped_step"):
            lines.append(f"| {r['step']} | not trained: every group tied | {r.get('train/reward', float('nan')):.3f} "
                         f"| {r.get('train/success', float('nan')):.2f} | | | | | | |")  # fmt: skip
        elif r.get("split") == "train":
            d = dev.get(r["step"])
            lines.append(
                f"| {r['step']} | {r.get('lr', float('nan')):.1e} | {r.get('train/reward', float('nan')):.3f} "
                f"| {r.get('train/success', float('nan')):.2f} | {r.get('entropy', float('nan')):.3f} "
                f"| {r.get('logprob_drift_mean_abs', float('nan')):.3f} | {r.get('policy_lag_mean', float('nan')):.2f} "
                f"| {r.get('loss/clip_frac', 0):.3f} "
                f"| {r.get('grad_norm', float('nan')):.2f} | {'' if d is None else f'{d:.0%}'} |"
            )
        elif r.get("split") == "restore":
            lines.append(f"| {r['step']} | restore: step {int(r['restored_from'])} | | | | | | | | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--root", type=Path, default=Path("/tmp/demo-seeds"))
    ap.add_argument("demo_args", nargs="*", help="after --: options for the demo (DemoConfig fields)")
    args = ap.parse_args()
    summary = ["| seed | baseline | final (held-out success) | served step | wall time | load avg (1 min) at end |",
               "|---|---|---|---|---|---|"]  # fmt: skip
    for seed in args.seeds:
        root = args.root / f"seed-{seed}"
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "advantage.tasks.tool_use.train", "--seed", str(seed), "--root", str(root),
             *args.demo_args],
            cwd=REPO, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
        wall = time.perf_counter() - t0
        out = proc.stdout
        args.root.mkdir(parents=True, exist_ok=True)  # a run that fails before its first checkpoint leaves none
        (args.root / f"seed-{seed}.log").write_text(out + proc.stderr[-5000:])
        last = re.search(r"held-out success (\d+)% -> (\d+)%.*\(serving step (\d+)(.*)\)", out)
        if proc.returncode or not last:
            summary.append(f"| {seed} | failed (exit {proc.returncode}) | | | {wall / 60:.1f} min | |")
        else:
            summary.append(
                f"| {seed} | {last.group(1)} % | **{last.group(2)} %** | {last.group(3)}{last.group(4)} "
                f"| {wall / 60:.1f} min | {os.getloadavg()[0]:.2f} |"
            )
        print(summary[-1], flush=True)
        run_dir = root / "demo" / "models" / "tool-use-001"
        if (run_dir / "metrics.jsonl").exists():
            print(f"\nseed {seed}:\n{curves(run_dir)}\n", flush=True)
    print("\n".join(summary))


if __name__ == "__main__":
    main()
