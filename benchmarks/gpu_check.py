"""GPU check: the CPU engine and trainer on CUDA, measured on a SmolLM2-135M-shaped model.

A GPU box has no bundled GGUF (and no network), so the model is SmolLM2-135M-Instruct's exact config and
tokenizer with random weights made there (`make-model`). Its final norm's weight is scaled (x12) so that
its next-token distributions are peaked like a trained model's (entropy ~2.8 nats on random text) rather
than uniform (~10.7); the JSON reports the sampled tokens' mean NLL. (Scaling the tied embedding instead
makes the model copy its input token with probability 1.) The logprob agreement it measures is about
arithmetic, not about what the model says.

`bench`, for each precision (bf16, the CUDA default, and fp32), one TorchEngine and one Trainer:
- generation: the demo's first-turn prompts (4 scenarios, ~820 tokens, sharing a ~780-token system prompt
  with the tool schemas) x 8 rollouts = 32, 64 new tokens each (T = 1, seeded; a random model rarely ends
  early), all submitted at once as a demo step does; a warm-up, then `--repeats` timed runs, with the
  prefix cache cleared before each ("cold") and kept ("warm"), then with the trained adapter (peft layers);
- one GRPO step on those 32 sequences (CISPO, token_mean, micro-batches of 8, as `model.train`):
  forward_backward + optim_step + save (adapter + optimizer) + hot swap into the engine, each timed;
- sampler vs trainer: the engine's logprobs of its sampled tokens against the trainer's forward pass of
  the same sequences, on the base weights and, after the step, on the hot-swapped adapter: mean and max |Δ|.

    python benchmarks/gpu_check.py make-model --config-dir DIR --out /tmp/smollm2-random
    python benchmarks/gpu_check.py bench --model-dir /tmp/smollm2-random --device cuda --json OUT.json
    python benchmarks/gpu_check.py bench ... --device cpu --small     # the same path, small, on a CPU
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from advantage.config import LoRAConfig, TrainConfig  # noqa: E402
from advantage.engine.chat import render_prompt  # noqa: E402
from advantage.engine.sampling import SamplingParams  # noqa: E402
from advantage.engine.torch_engine import TorchEngine  # noqa: E402
from advantage.tasks.tool_use.env import TOOLS, make_scenarios  # noqa: E402
from advantage.tasks.tool_use.rollout import initial_messages  # noqa: E402
from advantage.training.grpo import loss_config  # noqa: E402
from advantage.training.primitives import forward, forward_backward  # noqa: E402
from advantage.training.trainer import Datum, Trainer  # noqa: E402

MODEL_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
)


def make_model(config_dir: Path, out: Path, small: bool, logit_scale: float, seed: int) -> None:
    """SmolLM2's config and tokenizer files, random weights (`small`: 4 layers, for a CPU rehearsal)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        if (config_dir / name).exists():
            shutil.copy(config_dir / name, out / name)
    cfg = AutoConfig.from_pretrained(config_dir)
    if small:
        cfg.num_hidden_layers = 4
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # the head's input x k: logits x k, i.e. peaked distributions
        model.get_decoder().norm.weight.mul_(logit_scale)
    model.save_pretrained(out)
    for name in MODEL_FILES:  # save_pretrained rewrites config.json; keep the tokenizer files as they were
        if name != "config.json" and (config_dir / name).exists():
            shutil.copy(config_dir / name, out / name)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _prompts(engine: TorchEngine, groups: int) -> list[list[int]]:
    out = []
    for sc in make_scenarios(groups, seed=7, split="train"):
        text = render_prompt(engine.tokenizer, initial_messages(sc), tools=TOOLS)
        out.append(engine.tokenizer.encode(text, add_special_tokens=False))
    return out


async def _generate(
    engine: TorchEngine, prompts: list[list[int]], n: int, new: int, seed: int, adapter: str | None
) -> tuple[list[Datum], float, int]:
    """All groups at once; returns (datums with the sampler's logprobs, seconds, generated tokens)."""
    t0 = time.perf_counter()
    params = [
        SamplingParams(max_tokens=new, temperature=1.0, seed=seed + 1000 * g, n=n)
        for g in range(len(prompts))
    ]
    results = await asyncio.gather(
        *(engine.generate(p, sp, adapter) for p, sp in zip(prompts, params, strict=True))
    )
    seconds = time.perf_counter() - t0
    datums, tokens = [], 0
    for ids, cs in zip(prompts, results, strict=True):
        for c in cs:
            tokens += len(c.token_ids)
            datums.append(
                Datum(
                    input_ids=ids + c.token_ids,
                    loss_mask=[0] * len(ids) + [1] * len(c.token_ids),
                    logprobs=[0.0] * len(ids) + c.logprobs,
                )
            )
    return datums, seconds, tokens


def _agreement(trainer: Trainer, datums: list[Datum], mb: int) -> dict[str, float]:
    new = forward(trainer, datums, mb)
    diffs = [
        abs(a - b)
        for d, lp in zip(datums, new, strict=True)
        for a, b, m in zip(lp, d.old_logprobs or [], d.loss_mask, strict=True)
        if m
    ]
    sampled = [-b for d in datums for b, m in zip(d.old_logprobs or [], d.loss_mask, strict=True) if m]
    return {
        "mean_abs": statistics.fmean(diffs),
        "max_abs": max(diffs),
        "p99_abs": sorted(diffs)[int(0.99 * (len(diffs) - 1))],
        "tokens": len(diffs),
        "sampled_nll_mean": statistics.fmean(sampled),  # how peaked the model is (a trained one: ~1-2)
    }


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


async def bench_dtype(args: argparse.Namespace, dtype: str) -> dict[str, Any]:
    dev = args.device
    t0 = time.perf_counter()
    engine = TorchEngine(args.model_dir, device=dev, dtype=dtype, max_batch_size=64, cascade=True)
    trainer = Trainer(args.model_dir, LoRAConfig(), device=dev, dtype=dtype)
    load_s = time.perf_counter() - t0
    out: dict[str, Any] = {"dtype": dtype, "load_s": load_s}
    groups, n, new = args.groups, args.group_size, args.new_tokens
    cfg = TrainConfig(learning_rate=args.lr)
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        prompts = _prompts(engine, groups)
        out["prompt_tokens"] = [len(p) for p in prompts]
        out["shared_prefix_tokens"] = len(os.path.commonprefix(prompts))
        await _generate(engine, prompts, n, new, 1, None)  # warm-up: kernels, allocator
        runs: dict[str, list[float]] = {"cold": [], "warm": [], "warm_no_cascade": []}
        datums: list[Datum] = []
        cascade_datums: list[Datum] = []
        cascade = engine.cascade
        for r in range(args.repeats):
            for kind in ("cold", "warm", "warm_no_cascade"):
                if kind == "cold":
                    engine.prefix_cache.clear(all_adapters=True)
                engine.cascade = cascade and kind != "warm_no_cascade"  # safe between requests: no rows run
                _sync(dev)
                got, s, tok = await _generate(engine, prompts, n, new, 100 + r, None)
                runs[kind].append(tok / s)
                if kind == "warm":
                    cascade_datums = got
                if kind == "warm_no_cascade":  # the default off CPUs
                    datums = got
        engine.cascade = cascade
        out["cascade"] = cascade
        out["gen_tok_s_warm_no_cascade"] = _median(runs["warm_no_cascade"])
        out["gen_tokens"] = tok
        out["gen_tok_s_cold"] = _median(runs["cold"])
        out["gen_tok_s_warm"] = _median(runs["warm"])
        out["gen_s_cold"] = tok / out["gen_tok_s_cold"]
        out["agree_base"] = _agreement(trainer, datums, cfg.micro_batch_size)
        out["agree_base_cascade"] = _agreement(trainer, cascade_datums, cfg.micro_batch_size)

        steps = []
        for step in range(args.train_steps):  # the first includes the trainer's warm-up
            adv = [(1.0 if (i * 7 + step) % 3 else -1.0) for i in range(len(datums))]
            batch = [d.model_copy(update={"advantage": a}) for d, a in zip(datums, adv, strict=True)]
            _sync(dev)
            t = time.perf_counter()
            fb, _ = forward_backward(trainer, batch, cfg.loss, loss_config(cfg), cfg.micro_batch_size)
            _sync(dev)
            t_fb = time.perf_counter()
            grad_norm = trainer.optim_step(cfg)
            _sync(dev)
            t_opt = time.perf_counter()
            adir = tmp / f"step{step + 1}"
            adir.mkdir()
            trainer.save(adir)
            t_save = time.perf_counter()
            engine.load_adapter("policy", adir)  # the hot swap a published step does
            t_swap = time.perf_counter()
            steps.append(
                {
                    "forward_backward_s": t_fb - t,
                    "optim_step_s": t_opt - t_fb,
                    "save_s": t_save - t_opt,
                    "hot_swap_s": t_swap - t_save,
                    "total_s": t_swap - t,
                    "grad_norm": grad_norm,
                    "loss": fb.get("loss", float("nan")),
                    "trained_tokens": fb["trained_tokens"],
                }
            )
        out["train_steps"] = steps
        timed = steps[1:] or steps
        out["train_step_s"] = _median([s["total_s"] for s in timed])
        out["train_tok_s"] = statistics.fmean(s["trained_tokens"] for s in timed) / out["train_step_s"]

        engine.cascade = False  # the default off CPUs
        adapted, s, tok = await _generate(engine, prompts, n, new, 500, "policy")
        out["gen_tok_s_adapter"] = tok / s
        out["agree_adapter"] = _agreement(trainer, adapted, cfg.micro_batch_size)  # hot-swapped weights
        if dev.startswith("cuda"):
            out["cuda_max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    finally:
        engine.close()
        del trainer
        shutil.rmtree(tmp, ignore_errors=True)
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()
    return out


def environment(device: str) -> dict[str, Any]:
    import peft
    import transformers

    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "device": device,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make-model", help="SmolLM2-135M's config + tokenizer with random weights")
    mk.add_argument("--config-dir", type=Path, required=True)
    mk.add_argument("--out", type=Path, required=True)
    mk.add_argument("--small", action="store_true", help="4 layers instead of 30 (a CPU rehearsal)")
    mk.add_argument(
        "--logit-scale", type=float, default=12.0, help="final norm's weight x this: peaked logits"
    )
    mk.add_argument("--seed", type=int, default=0)
    b = sub.add_parser("bench", help="generation, a GRPO step and logprob agreement")
    b.add_argument("--model-dir", type=Path, required=True)
    b.add_argument("--device", default="cuda")
    b.add_argument("--dtypes", default="bfloat16,float32")
    b.add_argument(
        "--small", action="store_true", help="2 groups x 4 rollouts x 16 tokens, 1 repeat, 2 steps"
    )
    b.add_argument("--groups", type=int, default=4)
    b.add_argument("--group-size", type=int, default=8)
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--train-steps", type=int, default=3)
    b.add_argument("--lr", type=float, default=1e-4)
    b.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = ap.parse_args()
    if args.cmd == "make-model":
        make_model(args.config_dir, args.out, args.small, args.logit_scale, args.seed)
        print(f"wrote {args.out}")
        return
    if args.small:
        args.groups, args.group_size, args.new_tokens, args.repeats, args.train_steps = 2, 4, 16, 1, 2
    t0 = time.perf_counter()
    summary: dict[str, Any] = {"env": environment(args.device), "results": {}}
    for dtype in args.dtypes.split(","):
        try:
            summary["results"][dtype] = asyncio.run(bench_dtype(args, dtype))
        except Exception as exc:  # one precision failing must not hide the other's numbers
            traceback.print_exc()
            summary["results"][dtype] = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps({dtype: summary["results"][dtype]}, indent=1), flush=True)
    summary["seconds"] = time.perf_counter() - t0
    text = json.dumps(summary, indent=1)
    if args.json:
        args.json.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
