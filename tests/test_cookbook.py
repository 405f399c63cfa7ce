"""The cookbook examples run end to end as 2-step smoke tests on the real bundled model (a few rollouts
each, so they show the code paths work, not that the reward rises: the demo's slow test does that)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import advantage as adv
from examples.cookbook import custom_rl_loop, distill, sft_then_rl

pytestmark = pytest.mark.integration


async def test_custom_rl_loop_two_steps(tmp_path: Path) -> None:
    curve = await custom_rl_loop.main(
        steps=2, groups=2, group_size=4, lr=7e-4, backend_url=None, root=str(tmp_path)
    )
    assert len(curve) == 2 and all(0.0 <= r <= 1.0 for r in curve)
    mdir = tmp_path / "cookbook" / "models" / "custom-loop"
    steps = sorted(p.name for p in mdir.iterdir() if p.name.isdigit())
    assert steps[0] == "0000" and len(steps) >= 2  # at least one step had signal and was saved


async def test_sft_then_rl_two_steps(tmp_path: Path) -> None:
    recipe = sft_then_rl.Recipe(
        root=str(tmp_path), collect=1, samples=3, min_reward=-math.inf, rl_steps=1, rl_groups=1,
        rl_group_size=3, val_size=0, sft=adv.SFTConfig(epochs=1, batch_size=4),
    )  # fmt: skip
    out = await sft_then_rl.run(recipe)
    assert out["kept"] == out["collected"] == 3
    assert out["sft/steps"] == 1.0 and math.isfinite(out["sft/loss_last"])


@pytest.mark.parametrize("top_k", [0, 4])
async def test_distill_one_step(tmp_path: Path, top_k: int) -> None:
    """The base model as its own teacher (step 0 of a teacher run): every path of the recipe runs, and the
    teacher's scores of the student's tokens equal the student's own (reverse KL 0 up to rounding; with
    soft targets, the KL to the teacher's top 4 too)."""
    (tmp_path / "demo" / "models" / "t").mkdir(parents=True)
    recipe = distill.Recipe(
        teacher="t@0", root=str(tmp_path), steps=1, groups_per_step=1, group_size=2, val_size=0,
        eval_every=0, top_k=top_k,
    )  # fmt: skip
    out = await distill.run(recipe)
    assert math.isfinite(out["seconds"])
    rows = [
        json.loads(line)
        for line in (tmp_path / "cookbook" / "models" / "onpolicy-001" / "metrics.jsonl").open()
    ]
    [step] = [r for r in rows if r.get("step") == 1 and "distill/reverse_kl" in r]
    assert step["distill/tokens"] > 0 and abs(step["distill/reverse_kl"]) < 1e-3
    if top_k:
        assert 0 < step["distill/teacher_mass"] <= 1 and abs(step["distill/topk_kl"]) < 1e-3
