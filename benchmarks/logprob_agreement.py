"""Sampler vs trainer: do the engine and the trainer give the same logprobs for the same sampled tokens?

For each precision (a bf16 decoder with bf16 logits, the old default; a bf16 decoder with the fp32 norm +
head + log-softmax, the default on CUDA; an fp32 decoder, the default on every CPU), one
engine and one trainer on the bundled SmolLM2-135M-Instruct (no adapter) are built. The engine samples
G demo prompts x N completions (T = 0.7, seeded, up to 48 tokens, concurrently, as a demo step does); the
trainer then recomputes the sampled tokens' logprobs in micro-batches of 8 (as `model.train` does). Printed:
mean and max |engine - trainer| over all sampled tokens, and the trainer against itself for the same
sequences in a batch of 2 and in a batch of 6 (batch invariance).

    .venv/bin/python benchmarks/logprob_agreement.py [--groups 4] [--group-size 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for `examples`

from advantage.config import LoRAConfig  # noqa: E402
from advantage.engine.chat import render_prompt  # noqa: E402
from advantage.engine.models import resolve_model_path  # noqa: E402
from advantage.engine.sampling import SamplingParams  # noqa: E402
from advantage.engine.torch_engine import TorchEngine  # noqa: E402
from advantage.tasks.tool_use.env import TOOLS, make_scenarios  # noqa: E402
from advantage.tasks.tool_use.rollout import initial_messages  # noqa: E402
from advantage.training.primitives import forward  # noqa: E402
from advantage.training.trainer import Datum, Trainer  # noqa: E402


def _diffs(a: list[list[float]], b: list[list[float]], masks: list[list[int]]) -> list[float]:
    return [
        abs(x - y)
        for ra, rb, m in zip(a, b, masks, strict=True)
        for x, y, k in zip(ra, rb, m, strict=True)
        if k
    ]


async def measure(dtype: str, head: str, groups: int, group_size: int) -> dict[str, float]:
    path = resolve_model_path("smollm2-135m-instruct")
    engine = TorchEngine(path, dtype=dtype, head_dtype=head)
    trainer = Trainer(path, LoRAConfig(), dtype=dtype, head_dtype=head)
    datums: list[Datum] = []
    try:
        jobs = []
        for g, sc in enumerate(make_scenarios(groups, seed=7, split="train")):
            text = render_prompt(engine.tokenizer, initial_messages(sc), tools=TOOLS)
            ids = engine.tokenizer.encode(text, add_special_tokens=False)
            params = SamplingParams(max_tokens=48, temperature=0.7, seed=1000 * g, n=group_size)
            jobs.append((ids, engine.generate(ids, params, None)))
        for ids, job in jobs:
            for c in await job:
                full = ids + c.token_ids
                mask = [0] * len(ids) + [1] * len(c.token_ids)
                datums.append(Datum(input_ids=full, loss_mask=mask, logprobs=[0.0] * len(ids) + c.logprobs))
    finally:
        engine.close()
    masks = [d.loss_mask for d in datums]
    sampler = [d.old_logprobs or [] for d in datums]
    trained = forward(trainer, datums, 8)
    d_st = _diffs(sampler, trained, masks)
    # Batch invariance: the first two sequences alone, then with four more beside them.
    two = forward(trainer, datums[:2], 2)
    six = forward(trainer, datums[:6], 6)[:2]
    d_b = _diffs(two, six, masks[:2])
    return {
        "tokens": float(len(d_st)),
        "sampler_trainer_mean": sum(d_st) / len(d_st),
        "sampler_trainer_max": max(d_st),
        "batch2_vs_6_mean": sum(d_b) / len(d_b),
        "batch2_vs_6_max": max(d_b),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8)
    args = ap.parse_args()
    print(
        "| decoder | head | sampled tokens | sampler vs trainer: mean abs | max | batch 2 vs 6: mean | max |"
    )
    print("|---|---|---|---|---|---|---|")
    for dtype, head in (("bfloat16", "bfloat16"), ("bfloat16", "float32"), ("float32", "float32")):
        r = asyncio.run(measure(dtype, head, args.groups, args.group_size))
        print(
            f"| {dtype} | {head} | {r['tokens']:.0f} | {r['sampler_trainer_mean']:.4f} | {r['sampler_trainer_max']:.4f} "
            f"| {r['batch2_vs_6_mean']:.4f} | {r['batch2_vs_6_max']:.4f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
