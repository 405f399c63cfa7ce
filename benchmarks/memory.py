"""Memory of one process (issue 15, item 3): the resident memory of a `LocalBackend` with one registered
model, and the peak resident memory of one training step with and without gradient checkpointing.

    .venv/bin/python benchmarks/memory.py [--before OLD/src] [--model smollm2-135m-instruct]

Every row comes from a fresh process (Linux: VmRSS, RssAnon, RssFile and VmHWM of /proc/self/status).
`--before OLD/src` runs the same with the package at OLD/src, side by side: a checkout of an earlier commit,
e.g. `git worktree add --detach /tmp/before HEAD~1`, then `--before /tmp/before/src`. RSS is measured when the
model is registered and again after the step: a trainer that maps the checkpoint file reads its pages only
when it first runs.

The step is the trainer's part of `grpo.train_step` (forward_backward over the micro-batches, one AdamW step)
on made-up datums shaped like a demo step: `--groups` prompts of a shared system part plus a question, each
with `--group-size` completions. The peak is VmHWM after resetting it (`/proc/self/clear_refs`) just before.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def rss() -> dict[str, float]:
    """VmRSS, split into anonymous memory and file-backed pages (a checkpoint mapped into memory)."""
    return {k: status_mb(k) for k in ("VmRSS", "RssAnon", "RssFile")}


async def _register(model_name: str, root: str) -> object:
    import advantage as adv

    backend = adv.LocalBackend(root, progress=False)
    backend.service.share_base_weights = True  # the default now; opt-in in some older trees
    await adv.TrainableModel("m", project="p", base_model=model_name).register(backend)
    return backend


def _datums(args: argparse.Namespace) -> list:
    import random

    from advantage.wire.datum import Datum

    rng = random.Random(0)
    sys_ids = [rng.randrange(3, 49152) for _ in range(args.system)]
    out = []
    for _ in range(args.groups):
        prompt = sys_ids + [rng.randrange(3, 49152) for _ in range(args.question)]
        for k in range(args.group_size):
            comp = [rng.randrange(3, 49152) for _ in range(args.completion - 1)] + [2]
            out.append(
                Datum(
                    input_ids=prompt + comp,
                    loss_mask=[0.0] * len(prompt) + [1.0] * len(comp),
                    logprobs=[0.0] * len(prompt) + [-2.0] * len(comp),
                    advantage=1.0 if k % 2 else -1.0,
                )
            )
    return out


def child(model_name: str, checkpointing: bool, args: argparse.Namespace) -> dict[str, object]:
    """Register one model on a LocalBackend, then run one training step: RSS at each point, and the peak."""
    from advantage.config import TrainConfig
    from advantage.training.primitives import forward_backward

    out: dict[str, object] = {"imports": rss()}
    with tempfile.TemporaryDirectory() as root:
        backend = asyncio.run(_register(model_name, root))
        out["registered"] = rss()
        trainer = backend.service.model_entry("m").trainer  # type: ignore[attr-defined]
        out["shares_base"] = bool(getattr(trainer, "shares_base", False))
        datums = _datums(args)
        config = TrainConfig(micro_batch_size=args.micro_batch_size)
        # `trainer.gradient_checkpointing` is new with this option; an older tree runs without it
        ctx = trainer.gradient_checkpointing(True) if checkpointing else contextlib.nullcontext()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        t0 = time.perf_counter()
        with ctx:
            forward_backward(trainer, datums, config.loss, config, config.micro_batch_size)
        trainer.optim_step(config)
        out["step_s"] = time.perf_counter() - t0
        out["step_peak_mb"] = status_mb("VmHWM")
        out["after_step"] = rss()
        out["tokens"] = sum(len(d.input_ids) for d in datums)
    return out


def run_child(src: Path, checkpointing: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, __file__, *sys.argv[1:], "--child", "on" if checkpointing else "off"]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _mb(r: dict[str, float]) -> str:
    return f"{r['VmRSS']:.0f} MB ({r['RssAnon']:.0f} + {r['RssFile']:.0f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--before", type=Path, help="the src/ of an earlier checkout, measured side by side")
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--system", type=int, default=200, help="tokens of the system part all prompts share")
    p.add_argument("--question", type=int, default=50, help="tokens of each group's own part of the prompt")
    p.add_argument("--completion", type=int, default=96, help="tokens of each completion")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.child == "on", args)))
        return

    runs = []
    if args.before is not None:
        runs.append((f"before ({args.before})", "off", run_child(args.before, False)))
    runs.append(("this tree", "off", run_child(REPO / "src", False)))
    runs.append(("this tree", "on", run_child(REPO / "src", True)))
    tokens = runs[0][2]["tokens"]
    print(
        f"LocalBackend + one registered {args.model}, then one training step ({args.groups} groups x "
        f"{args.group_size}, prompts {args.system} + {args.question} tokens, completions {args.completion}, "
        f"{tokens} tokens, micro_batch_size {args.micro_batch_size}); a fresh process each. RSS is VmRSS "
        "(anonymous + file-backed):\n"
    )
    print(
        "| tree | gradient checkpointing | trainer shares the engine's base | RSS, model registered "
        "| peak RSS in the step | RSS after the step | step time |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, on, r in runs:
        print(
            f"| {name} | {on} | {'yes' if r['shares_base'] else 'no'} | {_mb(r['registered'])} "
            f"| {r['step_peak_mb']:.0f} MB | {_mb(r['after_step'])} | {r['step_s']:.1f} s |"
        )


if __name__ == "__main__":
    main()
