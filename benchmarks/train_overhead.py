"""The GRPO update against the hardware's own limit: our forward_backward + optim_step vs a bare LoRA pass.

One process, one peft model (the bundled SmolLM2-135M-Instruct, LoRA r=8 alpha=16 on all linear layers, bf16),
one token batch shaped like the CPU demo's: G groups x N completions, each group sharing its prompt (the
real single-turn tool-use prompt of a different scenario, ~700 tokens), completion lengths drawn from a
seeded uniform range (token values do not change the cost). Measured side by side, alternating:

  (a) ours  `primitives.forward_backward(trainer, datums, "cispo")` + `trainer.optim_step`: micro-batches of
            one prompt, prefix sharing, the loss over the sampler's logprobs, the AdamW step.
  (b) bare  the same peft model on the same datums, micro-batches of the same sizes, each sequence run in
            full (right-padded), the LM head on the completion tokens only, loss = -mean logprob,
            backward, no optimizer step: the least a LoRA policy-gradient update has to do without
            prefix sharing.

  (c) ours, unpacked  (a) with `trainer.pack_suffixes = False`: one padded row per completion, the layout
            before suffix packing (with --unpacked; the before/after of the packing fix, side by side).

tokens/s = the batch's sequence tokens (every datum's prompt + completion) / wall time, for all, so the
ratio ours/bare is a ratio of wall times on the same work (target >= 0.8). Because (b) also recomputes
every prompt, a second ratio divides by the tokens each side actually runs (padding included): that one is
the per-token overhead of our layout, loss and optimizer step against plain peft. Packing efficiency is
forward_backward's own metric: tokens that carry data / tokens the model runs on, where a shared prompt
runs once per micro-batch and the suffixes fill rows as long as the longest one (target >= 0.9).

    .venv/bin/python benchmarks/train_overhead.py [--groups 4] [--group-size 8] [--min-len 16]
        [--max-len 96] [--repeats 1] [--unpacked] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for `examples`

import torch  # noqa: E402

from advantage.config import AdamParams, LoRAConfig  # noqa: E402
from advantage.engine.chat import render_prompt  # noqa: E402
from advantage.engine.models import resolve_model_path  # noqa: E402
from advantage.tasks.tool_use import single_turn  # noqa: E402
from advantage.tasks.tool_use.env import make_scenarios  # noqa: E402
from advantage.training import primitives  # noqa: E402
from advantage.training.trainer import Datum, Trainer, pack_rows, shared_prefix_len  # noqa: E402


def make_datums(trainer: Trainer, groups: int, group_size: int, lo: int, hi: int, seed: int) -> list[Datum]:
    rng = random.Random(seed)
    vocab = trainer.tokenizer.vocab_size
    datums = []
    for g, scenario in enumerate(make_scenarios(groups, seed=seed, split="train")):
        text = render_prompt(trainer.tokenizer, single_turn.prompt(scenario), tools=single_turn.TOOLS)
        prompt = trainer.tokenizer(text, add_special_tokens=False)["input_ids"]
        for k in range(group_size):
            n = rng.randint(lo, hi)
            completion = [rng.randrange(100, vocab) for _ in range(n)]
            datums.append(
                Datum(
                    input_ids=prompt + completion,
                    loss_mask=[0] * len(prompt) + [1] * n,
                    logprobs=[0.0] * len(prompt) + [-rng.uniform(0.1, 3.0) for _ in range(n)],
                    advantage=(k - (group_size - 1) / 2) / group_size + 0.01 * g,
                )
            )
    return datums


def executed_tokens(datums: list[Datum], mbs: int, layout: str) -> int:
    """Tokens the model runs on, padding included: "packed"/"rows" share the prompt, "bare" does not."""
    total = 0
    for idx in primitives.micro_batches(datums, mbs):
        chunk = [datums[i] for i in idx]
        if layout == "bare":
            total += len(chunk) * max(len(d.input_ids) for d in chunk)
            continue
        P = shared_prefix_len(chunk)
        lens = [len(d.input_ids) - P for d in chunk]
        total += P + (len(pack_rows(lens, max(lens))) if layout == "packed" else len(lens)) * max(lens)
    return total


def ours(
    trainer: Trainer, datums: list[Datum], mbs: int, packed: bool = True
) -> tuple[float, dict[str, float]]:
    trainer.pack_suffixes = packed
    t0 = time.perf_counter()
    metrics, _ = primitives.forward_backward(trainer, datums, "cispo", micro_batch_size=mbs)
    trainer.optim_step(AdamParams(learning_rate=1e-6))
    return time.perf_counter() - t0, metrics


def bare(trainer: Trainer, datums: list[Datum], mbs: int) -> float:
    model = trainer.model
    decoder, head = model.get_base_model().model, model.get_base_model().lm_head
    model.train()
    t0 = time.perf_counter()
    for idx in primitives.micro_batches(datums, mbs):
        chunk = [datums[i] for i in idx]
        L = max(len(d.input_ids) for d in chunk)
        ids_BL = torch.full((len(chunk), L), trainer.pad_id, dtype=torch.long)
        attn_BL = torch.zeros((len(chunk), L), dtype=torch.long)
        mask_BL = torch.zeros((len(chunk), L), dtype=torch.bool)
        for i, d in enumerate(chunk):
            n = len(d.input_ids)
            ids_BL[i, :n] = torch.tensor(d.input_ids)
            attn_BL[i, :n] = 1
            mask_BL[i, : n - 1] = torch.tensor(d.loss_mask[1:], dtype=torch.bool)  # position t predicts t+1
        h_BLH = decoder(input_ids=ids_BL, attention_mask=attn_BL).last_hidden_state
        logits_NV = head(h_BLH[mask_BL]).float()
        targets_N = ids_BL[:, 1:][mask_BL[:, :-1]]
        lp_N = torch.log_softmax(logits_NV, dim=-1).gather(1, targets_N.unsqueeze(1)).squeeze(1)
        (-lp_N.mean()).backward()
    seconds = time.perf_counter() - t0
    trainer.optimizer.zero_grad(set_to_none=True)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--min-len", type=int, default=16, help="shortest completion, tokens")
    ap.add_argument("--max-len", type=int, default=96, help="longest completion, tokens")
    ap.add_argument("--repeats", type=int, default=1, help="timed rounds after one warm-up")
    ap.add_argument("--unpacked", action="store_true", help="also time ours with one row per completion")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    trainer = Trainer(resolve_model_path(args.model), LoRAConfig(r=8, alpha=16, target_modules="all-linear"))
    datums = make_datums(trainer, args.groups, args.group_size, args.min_len, args.max_len, seed=0)
    tokens = sum(len(d.input_ids) for d in datums)
    prompt_len = statistics.fmean(len(primitives.prompt_key(d)) for d in datums)
    print(
        f"{args.model}, torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs"
    )
    print(
        f"batch: {args.groups} groups x {args.group_size} completions, prompt ~{prompt_len:.0f} tokens, "
        f"completions {args.min_len}-{args.max_len} tokens, {tokens} sequence tokens, "
        f"micro-batch size {args.micro_batch_size}"
    )

    mbs = args.micro_batch_size
    warm = datums[: args.group_size]
    ours(trainer, warm, mbs), bare(trainer, warm, mbs)  # warm-up: first-call allocations, kernels
    if args.unpacked:
        ours(trainer, warm, mbs, packed=False)
    times: dict[str, list[float]] = {"packed": [], "rows": [], "bare": []}
    metrics: dict[str, dict[str, float]] = {}
    for _ in range(args.repeats):
        s, metrics["packed"] = ours(trainer, datums, mbs)
        times["packed"].append(s)
        if args.unpacked:
            s, metrics["rows"] = ours(trainer, datums, mbs, packed=False)
            times["rows"].append(s)
        times["bare"].append(bare(trainer, datums, mbs))
    sec = {k: statistics.median(v) for k, v in times.items() if v}
    run = {k: executed_tokens(datums, mbs, k) for k in sec}
    names = {
        "packed": "ours: forward_backward(cispo) + optim_step",
        "rows": "ours, unpacked (one row per completion)",
        "bare": "bare peft LoRA forward + backward",
    }
    print()
    print(f"{'':<46}{'seconds':>9}{'tok/s':>9}{'tokens run':>12}{'run tok/s':>11}")
    for k, s in sec.items():
        print(f"{names[k]:<46}{s:>9.2f}{tokens / s:>9.1f}{run[k]:>12}{run[k] / s:>11.1f}")
    print(
        f"  (medians of {args.repeats}: "
        + ", ".join(f"{k} {[round(x, 2) for x in v]}" for k, v in times.items() if v)
        + ")"
    )
    ratio = sec["bare"] / sec["packed"]
    per_token = (run["packed"] / sec["packed"]) / (run["bare"] / sec["bare"])
    packing = metrics["packed"]["packing_efficiency"]
    print()
    print(
        f"ours / bare tokens/s:           {ratio:.2f}x  (target >= 0.8x)  {'OK' if ratio >= 0.8 else 'BELOW TARGET'}"
    )
    print(f"ours / bare per token run:      {per_token:.2f}x")
    print(
        f"packing efficiency:             {packing:.3f}  (target >= 0.9)  {'OK' if packing >= 0.9 else 'BELOW TARGET'}"
        f"  ({metrics['packed']['micro_batches']:.0f} micro-batches)"
    )
    result = {
        "tokens": tokens,
        "seconds": sec,
        "tokens_run": run,
        "ratio": ratio,
        "per_token_ratio": per_token,
        "packing_efficiency": packing,
    }
    if args.unpacked:
        rows_packing = metrics["rows"]["packing_efficiency"]
        print(f"packing efficiency, unpacked:   {rows_packing:.3f}")
        print(f"packed / unpacked speed-up:     {sec['rows'] / sec['packed']:.2f}x")
        result.update(unpacked_packing_efficiency=rows_packing, packed_speedup=sec["rows"] / sec["packed"])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
