"""Memory of one process (issue 15, item 3): the resident memory of a `LocalBackend` with one registered
model, and the peak resident memory of one training step with and without gradient checkpointing.

    .venv/bin/python benchmarks/memory.py [--before OLD/src] [--model smollm2-135m-instruct]

Every figure comes from a fresh process (Linux: VmRSS and VmHWM of /proc/self/status). `--before OLD/src`
measures the resident memory with the package at OLD/src too, side by side: a checkout of an earlier commit,
e.g. `git worktree add --detach /tmp/before HEAD~1`, then `--before /tmp/before/src`.

The step is the trainer's part of `grpo.train_step` (forward_backward over the micro-batches, one AdamW step)
on made-up datums shaped like a demo step: `--groups` prompts of a shared system part plus a question, each
with `--group-size` completions. The peak is VmHWM after resetting it (`/proc/self/clear_refs`) just before.
"""

from __future__ import annotations

import argparse
import asyncio
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


async def _register(model_name: str, root: str) -> object:
    import advantage as adv

    backend = adv.LocalBackend(root, progress=False)
    await adv.TrainableModel("m", project="p", base_model=model_name).register(backend)
    return backend


def child_resident(model_name: str) -> dict[str, float]:
    import advantage  # noqa: F401  (torch and transformers load with the package's modules, below)
    import torch  # noqa: F401

    before = status_mb("VmRSS")
    with tempfile.TemporaryDirectory() as root:
        backend = asyncio.run(_register(model_name, root))
        service = backend.service  # type: ignore[attr-defined]
        trainer = service.model_entry("m").trainer
        base = trainer.model.get_base_model()
        weights_mb = sum(p.numel() * p.element_size() for p in base.parameters()) / 2**20
        shares = bool(getattr(trainer, "shares_base", False))
        return {
            "rss_imports_mb": before,
            "rss_registered_mb": status_mb("VmRSS"),
            "base_weights_mb": weights_mb,
            "shares_base": float(shares),
        }


def _datums(groups: int, group_size: int, system: int, question: int, completion: int) -> list:
    import random

    from advantage.wire.datum import Datum

    rng = random.Random(0)
    vocab = 49152
    sys_ids = [rng.randrange(3, vocab) for _ in range(system)]
    out = []
    for _ in range(groups):
        prompt = sys_ids + [rng.randrange(3, vocab) for _ in range(question)]
        for k in range(group_size):
            comp = [rng.randrange(3, vocab) for _ in range(completion - 1)] + [2]
            n = len(prompt) + len(comp)
            out.append(
                Datum(
                    input_ids=prompt + comp,
                    loss_mask=[0.0] * len(prompt) + [1.0] * len(comp),
                    logprobs=[0.0] * len(prompt) + [-2.0] * len(comp),
                    advantage=1.0 if k % 2 else -1.0,
                )
            )
            assert len(out[-1].input_ids) == n
    return out


def child_step(model_name: str, checkpointing: bool, args: argparse.Namespace) -> dict[str, float]:
    from advantage.config import TrainConfig
    from advantage.training.primitives import forward_backward

    with tempfile.TemporaryDirectory() as root:
        backend = asyncio.run(_register(model_name, root))
        trainer = backend.service.model_entry("m").trainer  # type: ignore[attr-defined]
        datums = _datums(args.groups, args.group_size, args.system, args.question, args.completion)
        config = TrainConfig(gradient_checkpointing=checkpointing, micro_batch_size=args.micro_batch_size)
        before = status_mb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        t0 = time.perf_counter()
        with trainer.gradient_checkpointing(config.gradient_checkpointing):
            forward_backward(trainer, datums, config.loss, config, config.micro_batch_size)
        trainer.optim_step(config)
        return {
            "rss_before_step_mb": before,
            "peak_rss_step_mb": status_mb("VmHWM"),
            "step_s": time.perf_counter() - t0,
            "tokens": float(sum(len(d.input_ids) for d in datums)),
        }


def run_child(src: Path, *child_args: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, __file__, *sys.argv[1:], "--child", *child_args]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--before", type=Path, help="the src/ of an earlier checkout, measured side by side")
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--system", type=int, default=300, help="tokens of the system part all prompts share")
    p.add_argument("--question", type=int, default=100, help="tokens of each group's own part of the prompt")
    p.add_argument("--completion", type=int, default=128, help="tokens of each completion")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--skip-step", action="store_true", help="only the resident memory")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind = args.child[0]
        if kind == "resident":
            result = child_resident(args.model)
        else:
            result = child_step(args.model, args.child[1] == "on", args)
        print(json.dumps(result))
        return

    src = REPO / "src"
    rows = [("this tree", run_child(src, "resident"))]
    if args.before is not None:
        rows.append((f"before ({args.before})", run_child(args.before, "resident")))
    print(f"Resident memory, LocalBackend + one registered {args.model} (fresh process each):\n")
    print("| tree | RSS after imports | RSS, one model registered | its weights | trainer shares the engine's |")
    print("|---|---|---|---|---|")
    for name, r in rows:
        print(
            f"| {name} | {r['rss_imports_mb']:.0f} MB | {r['rss_registered_mb']:.0f} MB "
            f"| {r['base_weights_mb']:.0f} MB | {'yes' if r['shares_base'] else 'no'} |"
        )
    if args.skip_step:
        return
    print(
        f"\nOne training step ({args.groups} groups x {args.group_size}, prompts {args.system} + "
        f"{args.question} tokens, completions {args.completion}, micro_batch_size {args.micro_batch_size}):\n"
    )
    print("| gradient_checkpointing | RSS before the step | peak RSS in the step | step time |")
    print("|---|---|---|---|")
    for on in ("off", "on"):
        r = run_child(src, "step", on)
        print(
            f"| {on} | {r['rss_before_step_mb']:.0f} MB | {r['peak_rss_step_mb']:.0f} MB | {r['step_s']:.1f} s |"
        )


if __name__ == "__main__":
    main()
