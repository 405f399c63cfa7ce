"""Transparent huge pages for torch's CPU tensors, measured on one demo step: rollouts and the update.

torch's CPU allocator asks the kernel for transparent huge pages (`madvise(MADV_HUGEPAGE)`, 2 MiB pages) for
tensors of 2 MiB and more when `THP_MEM_ALLOC_ENABLE=1`; on a kernel whose THP mode is `madvise` (the
common default) nothing is huge otherwise. Fewer, larger pages mean fewer TLB misses on the weights, the KV
cache and the activations, and fewer page faults when a freed block's memory is handed back and retaken.

Each setting runs in a fresh process (torch reads the variable once, at its first allocation), in turn,
repeated in alternating order; each run is `omp_wait.py`'s child: the demo's 8 x 4 rollouts of one step
twice (the second timed), then one training step on them. Printed: seconds per setting (median over rounds)
and the ratio.

    .venv/bin/python benchmarks/hugepages.py [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from omp_wait import env_for

HERE = Path(__file__).resolve()
SETTINGS = {"4 KiB pages": "0", "huge pages": "1"}


def main(args: argparse.Namespace) -> dict[str, object]:
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in SETTINGS}
    for r in range(args.rounds):
        for label in SETTINGS if r % 2 == 0 else list(reversed(SETTINGS)):
            proc = subprocess.run(
                [sys.executable, str(HERE.parent / "omp_wait.py"), "--child"],
                env=env_for(None) | {"THP_MEM_ALLOC_ENABLE": SETTINGS[label]},
                capture_output=True,
                text=True,
                check=True,
            )
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[label].append(res)
            print(
                f"round {r + 1} {label:>12}: rollouts {res['rollouts']:5.1f} s, update {res['update']:5.1f} s",
                flush=True,
            )
    med = {
        k: {m: statistics.median(x[m] for x in v) for m in ("rollouts", "update")} for k, v in runs.items()
    }
    off, on = med["4 KiB pages"], med["huge pages"]
    print(
        f"huge pages: rollouts {off['rollouts'] / on['rollouts']:.2f}x, update {off['update'] / on['update']:.2f}x "
        f"the speed of 4 KiB pages (median of {args.rounds})"
    )
    return {"runs": runs, "median": med}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    result = main(a)
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
