"""advantage against TRL's GRPOTrainer: the same GRPO run on the same CPU, one command, both printed.

The task is the single-turn tool-call task (src/advantage/tasks/tool_use/single_turn.py): the demo's ~700-token prompt
(system message, worked example, question, tool schemas), one completion, reward = single_turn.reward(text).
Both trainers get the same conditions:

  model        the bundled SmolLM2-135M-Instruct, bf16 weights (TRL: model_init_kwargs dtype=bfloat16 and
               bf16=True on CPU), LoRA r=8, alpha=16, dropout 0, all linear layers
  prompts      the same scenarios: step k trains on make_scenarios(groups, seed=1000+k); TRL gets them in
               that order (shuffle_dataset=False) as plain-string prompts rendered with the chat template
               our server uses (`render_prompt(tokenizer, messages, tools=TOOLS)`)
  sampling     `groups` prompts x `group_size` completions per step, temperature 0.7, top_p 1,
               at most `max_tokens` new tokens
  update       one optimizer step per RL step over all the step's completions, micro-batches of one group
               (8 sequences); clipped-ratio loss with eps 0.2 both sides, token-mean aggregation (TRL's
               "dapo", our "ppo" with agg=token_mean), no KL (beta 0), group-std advantages, AdamW
               betas (0.9, 0.99), weight decay 0, grad clip 1.0, constant learning rate
  TRL          gradient checkpointing off (its default is on, which is slower), no vLLM (CPU)

What differs by design: our step includes `save_weights` (the new adapter is checkpointed and served by the
engine that samples the next step), TRL samples from the model it trains in-process; we skip groups whose
rewards are all equal, TRL runs them with zero advantage.

Each side runs in its own process: ours in this interpreter's environment, TRL in its own virtualenv
(`benchmarks/.venv-trl`, created on first use with pinned CPU packages: torch first, so no CUDA build is
pulled). The two run one after the other, never at once. Step time = wall time of one RL step (generation,
reward, update; ours also the checkpoint); the first step is reported apart as warm-up. tokens/s = prompt +
completion tokens of the step's sequences / step time. Reward after N steps = mean reward of greedy
completions on `--eval` held-out (val) scenarios with the final weights, plus the train reward per step.

    .venv/bin/python benchmarks/vs_trl.py [--steps 3] [--groups 4] [--group-size 8] [--max-tokens 48]
        [--lr 7e-4] [--eval 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / "benchmarks" / ".venv-trl"
# CPU wheels: torch alone and first (an unpinned torch, or a package that pulls one, brings a CUDA build).
TORCH_PIN = "torch==2.13.0"
TRL_PINS = ["trl==1.16.0", "peft==0.21.2", "transformers==5.23.0", "accelerate==1.15.0", "datasets==5.2.0"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(ROOT))  # for `examples`

MODEL = "smollm2-135m-instruct"


def step_scenarios(step: int, groups: int) -> list[Any]:
    from advantage.tasks.tool_use.env import make_scenarios

    return make_scenarios(groups, seed=1000 + step, split="train")


def eval_scenarios(n: int) -> list[Any]:
    from advantage.tasks.tool_use.env import make_scenarios

    return make_scenarios(n, seed=0, split="val")


# ------------------------------------------------------------------------------------------------- ours


def run_ours(a: argparse.Namespace) -> dict[str, Any]:
    import asyncio

    import advantage as adv
    from advantage.tasks.tool_use import single_turn
    from examples.cookbook.custom_rl_loop import group_datums

    async def go() -> dict[str, Any]:
        backend = adv.LocalBackend(tempfile.mkdtemp(prefix="vs-trl-ours-"), progress=False)
        model = adv.TrainableModel("vs-trl", project="bench", lora=adv.LoRAConfig(r=8, alpha=16))
        await model.register(backend)
        tc = await model.training_client()
        steps: list[dict[str, float]] = []

        async def evaluate() -> float:
            ev = eval_scenarios(a.eval)
            outs = await asyncio.gather(
                *(
                    tc.sample(
                        single_turn.prompt(s),
                        tools=single_turn.TOOLS,
                        n=1,
                        max_tokens=a.max_tokens,
                        temperature=0.0,
                    )
                    for s in ev
                )
            )
            return statistics.fmean(
                single_turn.reward(o.sequences[0].text, s) for o, s in zip(outs, ev, strict=True)
            )

        try:
            eval_reward_0 = await evaluate()
            for k in range(a.steps):
                t0 = time.perf_counter()
                scenarios = step_scenarios(k, a.groups)
                outs = await asyncio.gather(
                    *(
                        tc.sample(
                            single_turn.prompt(s),
                            tools=single_turn.TOOLS,
                            n=a.group_size,
                            max_tokens=a.max_tokens,
                            temperature=a.temperature,
                        )
                        for s in scenarios
                    )
                )
                t_gen = time.perf_counter() - t0
                batch, rewards, tokens = [], [], 0
                for s, out in zip(scenarios, outs, strict=True):
                    rs = [single_turn.reward(q.text, s) for q in out.sequences]
                    rewards += rs
                    tokens += sum(len(out.prompt_tokens) + len(q.tokens) for q in out.sequences)
                    batch += group_datums(out.prompt_tokens, out.sequences, rs)
                if batch:
                    cfg = {"eps": 0.2, "eps_high": 0.2, "agg": "token_mean"}
                    await tc.forward_backward(batch, "ppo", cfg, micro_batch_size=a.group_size)
                    await tc.optim_step(adv.AdamParams(lr=a.lr, betas=(0.9, 0.99)))
                    await tc.save_weights({"reward": statistics.fmean(rewards)})
                seconds = time.perf_counter() - t0
                steps.append(
                    {
                        "seconds": seconds,
                        "gen_seconds": t_gen,
                        "tokens": tokens,
                        "reward": statistics.fmean(rewards),
                    }
                )
                log("ours", k, steps[-1])
            eval_reward = await evaluate()
        finally:
            await backend.close()
        return {"steps": steps, "eval_reward": eval_reward, "eval_reward_0": eval_reward_0}

    return asyncio.run(go())


# -------------------------------------------------------------------------------------------------- TRL


def run_trl(a: argparse.Namespace) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from advantage.engine.chat import render_prompt
    from advantage.engine.models import resolve_model_path
    from advantage.tasks.tool_use import single_turn

    model_dir = str(resolve_model_path(MODEL))
    tok = AutoTokenizer.from_pretrained(model_dir)

    def text(s: Any) -> str:
        return render_prompt(tok, single_turn.prompt(s), tools=single_turn.TOOLS)

    by_id: dict[str, Any] = {}
    rows = []
    for k in range(a.steps):
        for i, s in enumerate(step_scenarios(k, a.groups)):
            by_id[f"{k}:{i}"] = s
            rows.append({"prompt": text(s), "sid": f"{k}:{i}"})
    prompt_len = {r["prompt"]: len(tok(r["prompt"], add_special_tokens=False)["input_ids"]) for r in rows}

    step_rewards: dict[int, list[float]] = {}
    step_tokens: dict[int, int] = {}

    def reward_fn(prompts, completions, completion_ids, sid, trainer_state, **_):  # noqa: ANN001, ANN202
        rs = [single_turn.reward(c, by_id[i]) for c, i in zip(completions, sid, strict=True)]
        step = trainer_state.global_step
        step_rewards.setdefault(step, []).extend(rs)
        step_tokens[step] = step_tokens.get(step, 0) + sum(
            prompt_len[p] + len(c) for p, c in zip(prompts, completion_ids, strict=True)
        )
        return rs

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001, ANN201
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001, ANN201
            times.append(time.perf_counter() - self.t0)
            k = len(times) - 1
            log(
                "trl",
                k,
                {
                    "seconds": times[-1],
                    "tokens": step_tokens.get(k, 0),
                    "reward": statistics.fmean(step_rewards.get(k, [0.0])),
                },
            )

    cfg = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="vs-trl-trl-"),
        use_cpu=True,
        bf16=True,
        model_init_kwargs={"dtype": torch.bfloat16},
        per_device_train_batch_size=a.group_size,
        gradient_accumulation_steps=a.groups,
        steps_per_generation=a.groups,
        num_generations=a.group_size,
        max_completion_length=a.max_tokens,
        temperature=a.temperature,
        top_p=1.0,
        learning_rate=a.lr,
        lr_scheduler_type="constant",
        adam_beta2=0.99,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=0.0,
        loss_type="dapo",
        epsilon=0.2,
        epsilon_high=0.2,
        gradient_checkpointing=False,
        max_steps=a.steps,
        shuffle_dataset=False,
        seed=0,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    peft_cfg = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    trainer = GRPOTrainer(
        model=model_dir,
        reward_funcs=reward_fn,
        args=cfg,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        peft_config=peft_cfg,
        callbacks=[Clock()],
    )
    ev = eval_scenarios(a.eval)

    def evaluate() -> float:
        model = trainer.model.eval()
        side, tok.padding_side = tok.padding_side, "left"
        enc = tok([text(s) for s in ev], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(
                **enc,
                max_new_tokens=a.max_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=tok.pad_token_id,
            )
        tok.padding_side = side
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        return statistics.fmean(single_turn.reward(t, s) for t, s in zip(texts, ev, strict=True))

    eval_reward_0 = evaluate()
    trainer.train()
    eval_reward = evaluate()
    steps = [
        {
            "seconds": times[k],
            "tokens": step_tokens.get(k, 0),
            "reward": statistics.fmean(step_rewards.get(k, [0.0])),
        }
        for k in range(len(times))
    ]
    import trl

    return {
        "steps": steps,
        "eval_reward": eval_reward,
        "eval_reward_0": eval_reward_0,
        "trl": trl.__version__,
    }


def log(side: str, k: int, s: dict[str, float]) -> None:
    gen = f" (generation {s['gen_seconds']:.1f} s)" if "gen_seconds" in s else ""
    print(
        f"[{side}] step {k + 1}: {s['seconds']:.1f} s{gen}, {s['tokens']} tokens, train reward {s['reward']:.3f}",
        file=sys.stderr,
        flush=True,
    )


# ------------------------------------------------------------------------------------------- the driver


def ensure_trl_venv() -> Path:
    py = VENV / "bin" / "python"
    stamp = VENV / ".installed"
    if stamp.exists():
        return py
    print(f"creating {VENV} (pinned, CPU torch) ...", flush=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, TORCH_PIN], check=True)
    subprocess.run([*pip, *TRL_PINS, TORCH_PIN], check=True)
    subprocess.run([*pip, "-r", str(ROOT / "requirements.txt")], check=True)  # our package, for the task
    subprocess.run([*pip, "--no-deps", "-e", str(ROOT)], check=True)
    stamp.touch()
    return py


def run_side(python: Path | str, side: str, a: argparse.Namespace) -> tuple[dict[str, Any], float]:
    out = Path(tempfile.mkdtemp(prefix="vs-trl-")) / f"{side}.json"
    argv = [
        str(python),
        __file__,
        "--side",
        side,
        "--out",
        str(out),
        "--steps",
        str(a.steps),
        "--groups",
        str(a.groups),
        "--group-size",
        str(a.group_size),
        "--max-tokens",
        str(a.max_tokens),
        "--lr",
        str(a.lr),
        "--temperature",
        str(a.temperature),
        "--eval",
        str(a.eval),
    ]
    load = os.getloadavg()[0]
    subprocess.run(argv, check=True, cwd=ROOT)
    return json.loads(out.read_text()), load


def summary(r: dict[str, Any]) -> dict[str, float]:
    steps = r["steps"]
    timed = steps[1:] or steps  # the first step is warm-up (first-call allocations, kernels)
    sec = statistics.fmean(s["seconds"] for s in timed)
    return {
        "first_step_s": steps[0]["seconds"],
        "step_s": sec,
        "steps_per_hour": 3600 / sec,
        "tok_s": sum(s["tokens"] for s in timed) / sum(s["seconds"] for s in timed),
        "train_reward_last": steps[-1]["reward"],
        "train_reward_mean": statistics.fmean(s["reward"] for s in steps),
        "eval_reward": r["eval_reward"],
        "eval_reward_0": r["eval_reward_0"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="RL steps per trainer")
    ap.add_argument("--groups", type=int, default=4, help="prompts per step")
    ap.add_argument("--group-size", type=int, default=8, help="completions per prompt (num_generations)")
    ap.add_argument("--max-tokens", type=int, default=48, help="completion length limit")
    ap.add_argument("--lr", type=float, default=7e-4)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--eval", type=int, default=16, help="held-out scenarios for the greedy final reward")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--side", choices=["ours", "trl"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side:
        result = run_ours(a) if a.side == "ours" else run_trl(a)
        Path(a.out).write_text(json.dumps(result))
        return

    trl_python = ensure_trl_venv()
    print(
        f"{a.steps} steps x {a.groups} prompts x {a.group_size} completions, max_tokens {a.max_tokens}, "
        f"T={a.temperature}, lr {a.lr}, LoRA r=8 alpha=16 all-linear, bf16, {os.cpu_count()} CPUs",
        flush=True,
    )
    t0 = time.perf_counter()
    ours, load_ours = run_side(sys.executable, "ours", a)
    trl, load_trl = run_side(trl_python, "trl", a)
    total = time.perf_counter() - t0
    so, st = summary(ours), summary(trl)

    print()
    print(f"{'':<34}{'advantage':>12}{'TRL ' + trl['trl']:>12}")
    rows = [
        ("step 1 (warm-up), s", "first_step_s", "{:.1f}"),
        (f"RL step, s (mean of steps 2-{a.steps})", "step_s", "{:.1f}"),
        ("steps / hour", "steps_per_hour", "{:.0f}"),
        ("tokens / s (prompt + completion)", "tok_s", "{:.0f}"),
        (f"train reward, step {a.steps}", "train_reward_last", "{:.3f}"),
        ("train reward, mean of steps", "train_reward_mean", "{:.3f}"),
        ("greedy reward before training", "eval_reward_0", "{:.3f}"),
        (f"greedy reward after {a.steps} steps ({a.eval} val)", "eval_reward", "{:.3f}"),
    ]
    for label, key, fmt in rows:
        print(f"{label:<34}{fmt.format(so[key]):>12}{fmt.format(st[key]):>12}")
    print(f"{'load average at start':<34}{load_ours:>12.2f}{load_trl:>12.2f}")
    ratio = so["steps_per_hour"] / st["steps_per_hour"]
    print()
    print(
        f"advantage / TRL steps per hour: {ratio:.2f}x  (target >= 3x)  {'OK' if ratio >= 3 else 'BELOW TARGET'}"
    )
    print(f"advantage / TRL tokens per s:   {so['tok_s'] / st['tok_s']:.2f}x")
    print(
        f"greedy reward after {a.steps} steps: advantage {so['eval_reward']:.3f}, TRL {st['eval_reward']:.3f} "
        f"({'equal or better' if so['eval_reward'] >= st['eval_reward'] else 'LOWER'})"
    )
    print(f"total wall time {total / 60:.1f} min")
    if a.json:
        Path(a.json).write_text(
            json.dumps(
                {
                    "ours": so,
                    "trl": st,
                    "ratio_steps_per_hour": ratio,
                    "trl_version": trl["trl"],
                    "load": [load_ours, load_trl],
                    "args": vars(a),
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
