"""On-policy distillation on the low-level API: a fresh LoRA learns the tool-use task from a trained demo
checkpoint's per-token judgement of its own rollouts, with no reward.

Each step the student runs the demo's episodes (the same rollout code, scenarios and seeds as `advantage
demo`) and the teacher judges them. With `--top-k 0` the teacher scores every token the student sampled
(`compute_logprobs` under `teacher@step`), and the per-token advantage is teacher minus student logprob, the
negative of the reverse-KL estimate (`advantage.distill`); the update is plain importance-sampled REINFORCE
with those advantages. The task's
reward is only printed, never trained on. Teacher and student share the base model, so they share the
tokenizer; any teacher the backend serves with the same tokenizer works (a bigger checkpoint too).

By default (`--top-k 20`) the teacher gives its 20 most likely tokens at every position the student reached
(`compute_top_logprobs`), and the student is trained on the KL to that distribution ("distill_topk", soft
targets): a signal at every token, where the sampled-token estimate (`--top-k 0`) only sees the token that
was sampled (metrics.jsonl adds `distill/topk_kl` and `distill/teacher_mass`). On the demo's seeds 0 and 1
soft targets reached the teacher's held-out success at step 6, RL from scratch at steps 10 and 8
(BENCHMARKS.md).

First train a teacher (`advantage demo` leaves `.advantage/demo/models/tool-use-001/`), then:

    python -m examples.cookbook.distill --teacher tool-use-001@12 --steps 8
    python -m examples.cookbook.distill --teacher tool-use-001@12 --eval-every 1 --stop-at-teacher true
    python -m examples.cookbook.distill --teacher tool-use-001@12 --top-k 0      # the sampled token only

Every `eval_every` steps the student is evaluated greedily on the demo's 16 dev questions (the teacher
too, once, at the start); at the end on the demo's 32 held-out questions. The run dir is
`<root>/cookbook/models/<name>/` (metrics.jsonl: `distill/reverse_kl`, `train/success`, `dev/success`).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

import advantage as adv
from advantage.config import Agg
from advantage.tasks.tool_use.env import make_scenarios
from advantage.tasks.tool_use.evaluation import evaluate, greedy_episodes, held_out
from advantage.tasks.tool_use.reward import success
from advantage.tasks.tool_use.rollout import rollout
from advantage.training.schedules import lr_at


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    teacher: str = Field("tool-use-001", description="The teacher, `name@step` (or `name`: its latest step).")
    teacher_project: str = Field("demo", description="The teacher's project under the root.")
    name: str = Field("onpolicy-001", description="Student model name (project 'cookbook').")
    root: str = Field(
        ".advantage", description="Checkpoint root of the embedded backend (the teacher's too)."
    )
    base_model: str = Field("smollm2-135m-instruct", description="The base model of teacher and student.")
    steps: int = Field(8, ge=0, description="Distillation steps.")
    groups_per_step: int = Field(8, ge=1, description="Scenarios per step (as the demo).")
    group_size: int = Field(4, ge=1, description="Rollouts per scenario (as the demo).")
    learning_rate: float = Field(1e-3, gt=0, le=1, description="Peak AdamW learning rate.")
    min_lr_ratio: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Cosine decay to this fraction of the peak at the last step (1: constant).",
    )
    warmup_steps: int = Field(0, ge=0, description="Steps of linear warm-up to the peak learning rate.")
    agg: Agg = Field(
        "token_mean",
        description="Loss aggregation: token_mean weighs long episodes more; seq_mean weighs each alike.",
    )
    temperature: float = Field(0.7, ge=0, le=2, description="Sampling temperature of the student's rollouts.")
    seed: int = Field(0, description="Seed of scenarios, rollouts and the dev/val questions (as the demo's).")
    val_size: int = Field(32, ge=0, description="Held-out questions for the final evaluation (0: none).")
    dev_size: int = Field(16, ge=1, description="Dev questions, evaluated every eval_every steps.")
    eval_every: int = Field(2, ge=0, description="Evaluate on dev every N steps (0: never).")
    val_every: int = Field(
        0, ge=0, description="Also evaluate on the held-out questions every N steps (0: only at the end)."
    )
    stop_at_teacher: bool = Field(False, description="Stop once dev success reaches the teacher's.")
    top_k: int = Field(
        20,
        ge=0,
        le=64,
        description="0: the sampled-token reverse KL as the advantage; K: the KL to the teacher's top K "
        "tokens at every position (soft targets).",
    )


async def run(r: Recipe) -> dict[str, float]:
    start = time.perf_counter()
    backend = adv.LocalBackend(r.root)
    teacher_name = r.teacher.partition("@")[0]
    if not (Path(r.root) / r.teacher_project / "models" / teacher_name).is_dir():
        raise SystemExit(
            f"No run of {teacher_name!r} under {r.root}/{r.teacher_project}: train a teacher first "
            "(`advantage demo`), or point --root and --teacher-project at one."
        )
    teacher = adv.TrainableModel(teacher_name, project=r.teacher_project, base_model=r.base_model)
    student = adv.TrainableModel(r.name, project="cookbook", base_model=r.base_model)
    out: dict[str, float] = {}
    try:
        await teacher.register(backend)  # serves its checkpoints as teacher@step
        await student.register(backend)
        tc = await student.training_client()
        val, dev = held_out(r.seed, max(r.val_size, 1), r.dev_size)
        teacher_ref = r.teacher if "@" in r.teacher else f"{teacher_name}@{await teacher.get_step()}"
        print(f"distilling {teacher_ref} into {student.name} (from step {await student.get_step()})")
        target = None
        served = adv.Model(teacher_ref, base_url=backend.base_url, api_key=backend.api_key)
        if r.eval_every:
            target = await success_rate(served, dev, "teacher dev eval")
            out["teacher_dev_success"] = target
            rate = await success_at_latest(student, dev, "dev eval", "dev")
            out["dev_success_0"] = rate
            print(f"teacher dev success {target:.0%}; student dev success {rate:.0%} (step 0)")
        if r.val_size and r.val_every:
            out["teacher_val_success"] = await success_rate(served, val, "teacher held-out eval")
            print(f"teacher held-out success {out['teacher_val_success']:.0%}")
        first = await student.get_step()
        schedule = adv.LRSchedule(
            kind="constant" if r.min_lr_ratio == 1 or r.steps <= 1 + r.warmup_steps else "cosine",
            warmup_steps=r.warmup_steps,
            total_steps=max(r.steps - 1, r.warmup_steps + 1),
            min_lr_ratio=r.min_lr_ratio,
        )
        for i in range(r.steps):
            t0 = time.perf_counter()
            scenarios = make_scenarios(r.groups_per_step, seed=r.seed * 100_003 + first + i, split="train")
            step_seed = (r.seed * 1_000_003 + first + i) * 1_000
            groups = await adv.gather_trajectory_groups(
                [
                    [
                        rollout(
                            student,
                            s,
                            temperature=r.temperature,
                            force_first_call=True,
                            seed=step_seed + 10 * (g * r.group_size + k),
                        )
                        for k in range(r.group_size)
                    ]
                    for g, s in enumerate(scenarios)
                ],
                max_exceptions=0.25,
                desc=f"step {first + i + 1} rollouts",
            )
            trajs = [t for g in groups for t in g.trajectories]
            datums = await tc.datums_from_groups(groups, skip_zero_variance=False)
            if r.top_k:
                top = await tc.compute_top_logprobs(datums, r.top_k, model=teacher_ref)
                batch, metrics = adv.topk_datums(datums, top)
                fb = await tc.forward_backward(batch, "distill_topk", {"agg": r.agg})
                metrics["distill/topk_kl"] = fb.metrics["loss"]
            else:
                scores = await tc.compute_logprobs(datums, model=teacher_ref)
                batch, metrics = adv.distill_datums(datums, scores)
                fb = await tc.forward_backward(batch, "importance_sampling", {"agg": r.agg})
            lr = lr_at(schedule, r.learning_rate, i)
            stepped = await tc.optim_step(adv.AdamParams(learning_rate=lr))
            metrics.update(
                {
                    "train/success": sum(t.metrics.get("success", 0.0) for t in trajs) / max(len(trajs), 1),
                    "train/reward": sum(t.reward for t in trajs) / max(len(trajs), 1),
                    "loss": fb.metrics["loss"],
                    "entropy": fb.metrics.get("entropy", float("nan")),
                    **stepped,
                    "lr": lr,
                    "seconds": time.perf_counter() - t0,
                }
            )
            name = await tc.save_weights(metrics)
            kl = f"top-{r.top_k} KL {metrics['distill/topk_kl']:.3f}  " if r.top_k else ""
            line = (
                f"{name}: {kl}reverse KL {metrics['distill/reverse_kl']:.3f}  train success "
                f"{metrics['train/success']:.2f}  ({metrics['seconds']:.0f} s, elapsed "
                f"{time.perf_counter() - start:.0f} s)"
            )
            if r.eval_every and (i + 1) % r.eval_every == 0:
                rate = await success_at_latest(student, dev, f"dev eval {name}", "dev")
                out[f"dev_success_{first + i + 1}"] = rate
                line += f"  dev success {rate:.0%}"
                if target is not None and rate >= target and "steps_to_teacher" not in out:
                    out["steps_to_teacher"] = float(i + 1)
            if r.val_size and r.val_every and (i + 1) % r.val_every == 0 and i + 1 < r.steps:
                rate = await success_at_latest(student, val, f"held-out eval {name}", "val")
                out[f"val_success_{first + i + 1}"] = rate
                line += f"  held-out success {rate:.0%}"
            print(line)
            if r.stop_at_teacher and "steps_to_teacher" in out:
                print(f"dev success reached the teacher's ({target:.0%}) after {i + 1} steps: stopping")
                break
        if r.val_size:
            out["val_success"] = await success_at_latest(student, val, "final eval", "val")
            print(f"held-out success {out['val_success']:.0%} at {student.get_inference_name()}")
        out["seconds"] = time.perf_counter() - start
    finally:
        await backend.close()
    return out


async def success_at_latest(model: adv.TrainableModel, scenarios: list, desc: str, split: str) -> float:
    """The student's greedy success at its latest step, logged as `split` at that step."""
    return (await evaluate(model, scenarios, desc, True, split, step=await model.get_step())).success


async def success_rate(model: adv.Model, scenarios: list, desc: str) -> float:
    """Greedy success on `scenarios`, as the demo evaluates, without logging (for the teacher)."""
    groups = await greedy_episodes(model, scenarios, desc)
    return sum(success(t) for g in groups for t in g.trajectories) / len(scenarios)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, field in Recipe.model_fields.items():
        ap.add_argument(f"--{name.replace('_', '-')}", default=None, help=field.description)
    given = {k: v for k, v in vars(ap.parse_args()).items() if v is not None}
    print(asyncio.run(run(Recipe(**given))))
