"""Run every benchmark one after the other and append a dated results section to BENCHMARKS.md.

    .venv/bin/python benchmarks/run_all.py [--only serve,overhead,trl] [--no-write]

Runs, in this order (never two at once; each measures its own ratios side by side):

  serve     benchmarks/serve_throughput.py --threads 1
  overhead  benchmarks/train_overhead.py --unpacked --json ...
  trl       benchmarks/vs_trl.py --json ...  (creates benchmarks/.venv-trl on first use)

Each one's full output goes to runs/bench-<date>/<name>.log. The section appended to BENCHMARKS.md gives
the machine (CPU model, cores, memory, load average before and after), the commit, the commands and a
table of the headline numbers against their targets. Other sections are left as they are.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mem_gib() -> float:
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))  # type: ignore[union-attr]
        return kb / 2**20
    except (OSError, AttributeError):
        return float("nan")


def run(name: str, argv: list[str], out_dir: Path) -> tuple[str, float]:
    print(f"== {name}: {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    (out_dir / f"{name}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    print(proc.stdout[-3000:], flush=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{name} failed with exit code {proc.returncode}; see {out_dir / (name + '.log')}")
    return proc.stdout, seconds


def grab(pattern: str, text: str) -> str:
    m = re.search(pattern, text)
    return m.group(1) if m else "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="serve,overhead,trl", help="comma-separated subset to run")
    ap.add_argument("--no-write", action="store_true", help="print the section, do not touch BENCHMARKS.md")
    a = ap.parse_args()
    which = [w.strip() for w in a.only.split(",") if w.strip()]

    today = dt.date.today().isoformat()
    out_dir = ROOT / "runs" / f"bench-{today}"
    out_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    os.environ.update(env)

    rows: list[tuple[str, str, str, str]] = []  # (benchmark, measured, target, verdict)
    commands: list[str] = []
    if "serve" in which:
        argv = [PY, "benchmarks/serve_throughput.py", "--threads", "1"]
        out, _ = run("serve", argv, out_dir)
        commands.append("benchmarks/serve_throughput.py --threads 1")
        r1 = grab(r"concurrent / sequential:\s+([\d.]+)x", out)
        r2 = grab(r"concurrent / offline:\s+([\d.]+)x", out)
        conc = grab(r"concurrent \(server\)\s+\d+\s+\d+\s+[\d.]+\s+([\d.]+)", out)
        rows.append(("serve: concurrent tok/s (16 requests)", conc, "", ""))
        rows.append(("serve: concurrent / sequential", f"{r1}x", ">= 5x", ok(r1, 5)))
        rows.append(("serve: concurrent / offline HF generate", f"{r2}x", ">= 0.9x", ok(r2, 0.9)))
    if "overhead" in which:
        js = out_dir / "train_overhead.json"
        argv = [PY, "benchmarks/train_overhead.py", "--unpacked", "--json", str(js)]
        run("overhead", argv, out_dir)
        commands.append("benchmarks/train_overhead.py --unpacked")
        r = json.loads(js.read_text())
        sec = r["seconds"]
        rows.append(
            (
                "update: ours tok/s (forward_backward + optim_step)",
                f"{r['tokens'] / sec['packed']:.0f}",
                "",
                "",
            )
        )
        rows.append(("update: bare peft LoRA fwd+bwd tok/s", f"{r['tokens'] / sec['bare']:.0f}", "", ""))
        rows.append(("update: ours / bare tok/s", f"{r['ratio']:.2f}x", ">= 0.8x", ok(r["ratio"], 0.8)))
        rows.append(("update: ours / bare per token run", f"{r['per_token_ratio']:.2f}x", "", ""))
        rows.append(
            (
                "update: packing efficiency",
                f"{r['packing_efficiency']:.3f}",
                ">= 0.9",
                ok(r["packing_efficiency"], 0.9),
            )
        )
        if "packed_speedup" in r:
            rows.append(
                (
                    "update: packing efficiency, one row per completion",
                    f"{r['unpacked_packing_efficiency']:.3f}",
                    "",
                    "",
                )
            )
            rows.append(
                ("update: packed / one-row-per-completion speed", f"{r['packed_speedup']:.2f}x", "", "")
            )
    if "trl" in which:
        js = out_dir / "vs_trl.json"
        argv = [PY, "benchmarks/vs_trl.py", "--json", str(js)]
        run("trl", argv, out_dir)
        commands.append("benchmarks/vs_trl.py")
        r = json.loads(js.read_text())
        o, t = r["ours"], r["trl"]
        n = r["args"]["steps"]
        rows.append(("vs TRL: RL step s, advantage / TRL", f"{o['step_s']:.1f} / {t['step_s']:.1f}", "", ""))
        rows.append(("vs TRL: tokens/s, advantage / TRL", f"{o['tok_s']:.0f} / {t['tok_s']:.0f}", "", ""))
        rows.append(
            (
                "vs TRL: steps/hour ratio",
                f"{r['ratio_steps_per_hour']:.2f}x",
                ">= 3x",
                ok(r["ratio_steps_per_hour"], 3),
            )
        )
        rows.append(
            (
                "vs TRL: greedy val reward before training, advantage / TRL",
                f"{o['eval_reward_0']:.3f} / {t['eval_reward_0']:.3f}",
                "",
                "",
            )
        )
        rows.append(
            (
                f"vs TRL: greedy val reward after {n} steps, advantage / TRL",
                f"{o['eval_reward']:.3f} / {t['eval_reward']:.3f}",
                "advantage >= TRL",
                "met" if o["eval_reward"] >= t["eval_reward"] else "not met",
            )
        )
        rows.append(
            (
                "vs TRL: mean train reward, advantage / TRL",
                f"{o['train_reward_mean']:.3f} / {t['train_reward_mean']:.3f}",
                "",
                "",
            )
        )
    load_after = os.getloadavg()

    shared = max(load_before[0], load_after[0]) > (os.cpu_count() or 1) + 0.5
    lines = [
        f"## Results of `benchmarks/run_all.py`, {today}",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, {mem_gib():.0f} GiB RAM, {platform.system()} "
        f"{platform.machine()}, Python {platform.python_version()}; commit {commit.stdout.strip()}"
        f"{' with uncommitted changes' if dirty.strip() else ''}. Load average before/after: "
        f"{load_before[0]:.2f} / {load_after[0]:.2f}"
        + (" (the machine was **shared**: other jobs ran during the measurements)." if shared else "."),
        "",
        "Commands (with `.venv/bin/python`, `HF_HUB_OFFLINE=1`, `OMP_WAIT_POLICY=PASSIVE`): "
        + "; ".join(f"`{c}`" for c in commands)
        + f". Full logs: `runs/bench-{today}/`.",
        "",
        "| benchmark | measured | target | |",
        "|---|---|---|---|",
        *(f"| {b} | {m} | {t} | {v} |" for b, m, t, v in rows),
        "",
    ]
    section = "\n".join(lines)
    print(section)
    if not a.no_write:
        path = ROOT / "BENCHMARKS.md"
        text = path.read_text()
        path.write_text(text.rstrip("\n") + "\n\n" + section)
        print(f"appended to {path}")


def ok(value: str | float, target: float) -> str:
    try:
        return "met" if float(value) >= target else "not met"
    except ValueError:
        return "?"


if __name__ == "__main__":
    main()
