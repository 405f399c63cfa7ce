"""advantage against TRL's GRPOTrainer: the same GRPO run on the same CPU, one command, both printed.

Two workloads (`--workload`):
  demo   the single-turn tool-call task (src/advantage/tasks/tool_use/single_turn.py): the demo's ~700-token
         prompt (system message, worked example, question, tool schemas), one completion graded on its first
         tool call. 4 prompts x 8 completions, 48 new tokens, T=0.7, lr 7e-4, micro-batches of 8.
  short  issue 18's workload W (src/advantage/tasks/dates.py): ~120-token prompts (a system instruction and
         one sentence with a date in words), answer as YYYY-MM-DD. 4 prompts x 8 completions, 32 new
         tokens, T=1.0, lr 1e-4, micro-batches of 32 (one forward/backward per step).
Both trainers get the same conditions:

  model        the bundled SmolLM2-135M-Instruct in the dtype our `dtype="auto"` picks on this machine
               (fp32 on CPUs, see engine/precision.py; `--dtype` overrides; TRL gets
               model_init_kwargs dtype and bf16=True/False to match), LoRA r=8, alpha=16, dropout 0, all
               linear layers
  prompts      the same scenarios: step k trains on make_scenarios(groups, seed=1000+k); TRL gets them in
               that order (shuffle_dataset=False) as plain-string prompts rendered with the chat template
               our server uses (`render_prompt(tokenizer, messages, tools=TOOLS)`)
  sampling     `groups` prompts x `group_size` completions per step, the workload's temperature, top_p 1,
               at most `max_tokens` new tokens
  update       one optimizer step per RL step over all the step's completions, in micro-batches of
               `micro_batch` sequences (TRL: per_device_train_batch_size); clipped-ratio loss with eps 0.2 both sides, token-mean aggregation (TRL's
               "dapo", our "ppo" with agg=token_mean), no KL (beta 0), group-std advantages, AdamW
               betas (0.9, 0.99), weight decay 0, grad clip 1.0, constant learning rate
  TRL          gradient checkpointing off (its default is on, which is slower), no vLLM (CPU)

What differs by design: our step includes `save_weights` (the new adapter is checkpointed and served by the
engine that samples the next step), TRL samples from the model it trains in-process. A group whose rewards
are all equal trains on both sides (with advantage 0; `model.train` would skip it), so both
do the same work each step.

Each side runs in its own process: ours in this interpreter's environment, TRL in its own virtualenv
(`benchmarks/.venv-trl`, created on first use with pinned CPU packages: torch first, so no CUDA build is
pulled). The two run one after the other, never at once. Step time = wall time of one RL step (generation,
reward, update; ours also the checkpoint), reported as the median of steps 3..N (steps 1-2 are warm-up), and
split into generation and the rest (update, checkpoint, hot swap). tokens/s = prompt +
completion tokens of the step's sequences / step time. Reward after N steps = mean reward of greedy
completions on `--eval` held-out (val) scenarios with the final weights, plus the train reward per step.

    .venv/bin/python benchmarks/vs_trl.py [--workload demo|short] [--steps 8] [--groups 4] [--group-size 8]
        [--max-tokens N] [--lr LR] [--temperature T] [--micro-batch N] [--dtype D] [--eval 16] [--json out.json]
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
# Per workload: the defaults of the knobs both trainers share (each can be overridden on the command line).
WORKLOADS: dict[str, dict[str, Any]] = {
    # the demo's ~700-token tool-use prompt, one completion graded on its first tool call
    "demo": {
        "groups": 4,
        "group_size": 8,
        "max_tokens": 48,
        "temperature": 0.7,
        "lr": 7e-4,
        "micro_batch": 8,
    },
    # ~120-token date-extraction prompts (advantage.tasks.dates), as issue 18's workload W
    "short": {
        "groups": 4,
        "group_size": 8,
        "max_tokens": 32,
        "temperature": 1.0,
        "lr": 1e-4,
        "micro_batch": 32,
    },
}


class Task:
    """The workload's scenarios, prompt, tools and reward, the same for both trainers."""

    def __init__(self, workload: str) -> None:
        if workload == "short":
            from advantage.tasks import dates

            self.make, self.prompt, self.reward, self.tools = (
                dates.make_scenarios,
                dates.prompt,
                dates.reward,
                None,
            )
        else:
            from advantage.tasks.tool_use import env, single_turn

            self.make, self.prompt, self.reward = env.make_scenarios, single_turn.prompt, single_turn.reward
            self.tools = single_turn.TOOLS

    def step_scenarios(self, step: int, groups: int) -> list[Any]:
        return self.make(groups, seed=1000 + step, split="train")

    def eval_scenarios(self, n: int) -> list[Any]:
        return self.make(n, seed=0, split="val")


# ------------------------------------------------------------------------------------------------- ours


def run_ours(a: argparse.Namespace) -> dict[str, Any]:
    import asyncio

    import advantage as adv
    from examples.cookbook.custom_rl_loop import group_datums

    task = Task(a.workload)

    async def go() -> dict[str, Any]:
        backend = adv.LocalBackend(tempfile.mkdtemp(prefix="vs-trl-ours-"), progress=False)
        model = adv.TrainableModel("vs-trl", project="bench", lora=adv.LoRAConfig(r=8, alpha=16))
        await model.register(backend)
        tc = await model.training_client()
        steps: list[dict[str, float]] = []

        async def evaluate() -> float:
            ev = task.eval_scenarios(a.eval)
            outs = await asyncio.gather(
                *(
                    tc.sample(
                        task.prompt(s),
                        tools=task.tools,
                        n=1,
                        max_tokens=a.max_tokens,
                        temperature=0.0,
                    )
                    for s in ev
                )
            )
            return statistics.fmean(
                task.reward(o.sequences[0].text, s) for o, s in zip(outs, ev, strict=True)
            )

        try:
            eval_reward_0 = await evaluate()
            for k in range(a.steps):
                t0 = time.perf_counter()
                scenarios = task.step_scenarios(k, a.groups)
                outs = await asyncio.gather(
                    *(
                        tc.sample(
                            task.prompt(s),
                            tools=task.tools,
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
                    rs = [task.reward(q.text, s) for q in out.sequences]
                    rewards += rs
                    tokens += sum(len(out.prompt_tokens) + len(q.tokens) for q in out.sequences)
                    # A group without reward variance trains with zero advantage, as in TRL: the same work.
                    batch += group_datums(out.prompt_tokens, out.sequences, rs) or [
                        d.model_copy(update={"advantage": 0.0})
                        for d in group_datums(out.prompt_tokens, out.sequences, list(range(len(rs))))
                    ]
                if batch:
                    cfg = {"eps": 0.2, "eps_high": 0.2, "agg": "token_mean"}
                    await tc.forward_backward(batch, "ppo", cfg, micro_batch_size=a.micro_batch)
                    await tc.optim_step(adv.AdamParams(learning_rate=a.lr, betas=(0.9, 0.99)))
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

    task = Task(a.workload)
    model_dir = str(resolve_model_path(MODEL))
    tok = AutoTokenizer.from_pretrained(model_dir)

    def text(s: Any) -> str:
        return render_prompt(tok, task.prompt(s), tools=task.tools)

    by_id: dict[str, Any] = {}
    rows = []
    for k in range(a.steps):
        for i, s in enumerate(task.step_scenarios(k, a.groups)):
            by_id[f"{k}:{i}"] = s
            rows.append({"prompt": text(s), "sid": f"{k}:{i}"})
    prompt_len = {r["prompt"]: len(tok(r["prompt"], add_special_tokens=False)["input_ids"]) for r in rows}

    step_rewards: dict[int, list[float]] = {}
    step_tokens: dict[int, int] = {}

    def reward_fn(prompts, completions, completion_ids, sid, trainer_state, **_):  # noqa: ANN001, ANN202
        rs = [task.reward(c, by_id[i]) for c, i in zip(completions, sid, strict=True)]
        step = trainer_state.global_step
        step_rewards.setdefault(step, []).extend(rs)
        step_tokens[step] = step_tokens.get(step, 0) + sum(
            prompt_len[p] + len(c) for p, c in zip(prompts, completion_ids, strict=True)
        )
        return rs

    times: list[float] = []
    gen_times: list[float] = []
    gen_clock = [0.0]  # seconds spent in GRPOTrainer._generate during the current step
    generate = GRPOTrainer._generate

    def timed_generate(self, prompts):  # noqa: ANN001, ANN202 (a stopwatch around TRL's own generation)
        t0 = time.perf_counter()
        try:
            return generate(self, prompts)
        finally:
            gen_clock[0] += time.perf_counter() - t0

    GRPOTrainer._generate = timed_generate

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001, ANN201
            self.t0 = time.perf_counter()
            gen_clock[0] = 0.0

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001, ANN201
            times.append(time.perf_counter() - self.t0)
            gen_times.append(gen_clock[0])
            k = len(times) - 1
            log(
                "trl",
                k,
                {
                    "seconds": times[-1],
                    "gen_seconds": gen_times[-1],
                    "tokens": step_tokens.get(k, 0),
                    "reward": statistics.fmean(step_rewards.get(k, [0.0])),
                },
            )

    accumulation = a.groups * a.group_size // a.micro_batch  # micro-batches per optimizer step
    cfg = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="vs-trl-trl-"),
        use_cpu=True,
        bf16=a.dtype == "bfloat16",
        model_init_kwargs={"dtype": getattr(torch, a.dtype)},
        per_device_train_batch_size=a.micro_batch,
        gradient_accumulation_steps=accumulation,
        steps_per_generation=accumulation,
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
    ev = task.eval_scenarios(a.eval)

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
        return statistics.fmean(task.reward(t, s) for t, s in zip(texts, ev, strict=True))

    eval_reward_0 = evaluate()
    trainer.train()
    eval_reward = evaluate()
    steps = [
        {
            "seconds": times[k],
            "gen_seconds": gen_times[k],
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
    argv = [str(python), __file__, "--side", side, "--out", str(out), "--workload", a.workload]
    for key in ("steps", "groups", "group_size", "max_tokens", "lr", "temperature", "eval", "micro_batch"):
        argv += [f"--{key.replace('_', '-')}", str(getattr(a, key))]
    argv += ["--dtype", a.dtype]
    load = os.getloadavg()[0]
    subprocess.run(argv, check=True, cwd=ROOT)
    return json.loads(out.read_text()), load


def summary(r: dict[str, Any]) -> dict[str, float]:
    steps = r["steps"]
    timed = steps[2:] or steps[1:] or steps  # steps 1-2 are warm-up (first-call allocations, kernels)
    sec = statistics.median(s["seconds"] for s in timed)
    gen = [s["gen_seconds"] for s in timed if "gen_seconds" in s]
    return {
        "first_step_s": steps[0]["seconds"],
        "step_s": sec,
        "gen_s": statistics.median(gen) if gen else float("nan"),
        "update_s": statistics.median(s["seconds"] - s["gen_seconds"] for s in timed)
        if gen
        else float("nan"),
        "steps_per_hour": 3600 / sec,
        "tok_s": sum(s["tokens"] for s in timed) / sum(s["seconds"] for s in timed),
        "train_reward_last": steps[-1]["reward"],
        "train_reward_mean": statistics.fmean(s["reward"] for s in steps),
        "eval_reward": r["eval_reward"],
        "eval_reward_0": r["eval_reward_0"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="demo", help="the task (see WORKLOADS)")
    ap.add_argument("--steps", type=int, default=3, help="RL steps per trainer")
    ap.add_argument("--groups", type=int, default=None, help="prompts per step")
    ap.add_argument("--group-size", type=int, default=None, help="completions per prompt (num_generations)")
    ap.add_argument("--max-tokens", type=int, default=None, help="completion length limit")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--temperature", type=float, default=None)
    ap.add_argument("--micro-batch", type=int, default=None, help="sequences per forward/backward")
    ap.add_argument("--dtype", default=None, help="bfloat16 or float32; default: what `dtype='auto'` picks")
    ap.add_argument("--eval", type=int, default=16, help="held-out scenarios for the greedy final reward")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--side", choices=["ours", "trl"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    for key, value in WORKLOADS[a.workload].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.dtype is None:  # both sides in the dtype our engine and trainer pick on this machine
        import torch

        from advantage.engine.precision import default_dtype

        a.dtype = default_dtype(torch.device("cpu"))
    if a.side:
        result = run_ours(a) if a.side == "ours" else run_trl(a)
        Path(a.out).write_text(json.dumps(result))
        return

    trl_python = ensure_trl_venv()
    print(
        f"workload {a.workload}: {a.steps} steps x {a.groups} prompts x {a.group_size} completions, max_tokens "
        f"{a.max_tokens}, T={a.temperature}, lr {a.lr}, micro-batch {a.micro_batch}, LoRA r=8 alpha=16 "
        f"all-linear, {a.dtype}, {os.cpu_count()} CPUs",
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
        (f"RL step, s (median of steps 3-{a.steps})", "step_s", "{:.1f}"),
        ("  of which generation, s", "gen_s", "{:.1f}"),
        ("  of which update (+ save, swap), s", "update_s", "{:.1f}"),
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
    target = 4 if a.workload == "short" else 3
    print()
    print(
        f"advantage / TRL steps per hour: {ratio:.2f}x  (target >= {target}x)  "
        f"{'OK' if ratio >= target else 'BELOW TARGET'}"
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
