"""How the demo measures a step: greedy episodes on the held-out (val) and dev questions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import openai

import advantage as adv

from .env import make_scenarios
from .reward import success
from .rollout import ChatModel, rollout


class Evaluation(NamedTuple):
    success: float  # the rate over the scenarios (an episode that failed to run counts as a miss)
    reward: float  # the mean over the episodes that ran
    outcomes: list[float]  # 1.0 / 0.0 per scenario, in the scenarios' order (CollapseGuard's paired test)


@dataclass(frozen=True)
class AtStep:
    """A model as rollouts see it (`ChatModel`), answering with one step's weights (`name@step`) whatever is
    trained meanwhile: an evaluation that runs beside the next update stays on the weights it evaluates."""

    model: adv.TrainableModel
    step: int

    def openai_client(self) -> openai.AsyncOpenAI:
        return self.model.openai_client()

    def get_inference_name(self) -> str:
        return self.model.get_inference_name(self.step)


async def evaluate(
    model: adv.TrainableModel, scenarios: list, desc: str, force: bool, split: str = "val", *, step: int
) -> Evaluation:
    """Greedy held-out evaluation of `step`'s weights, logged as `split` at that step."""
    groups = await greedy_episodes(AtStep(model, step), scenarios, desc, force)
    trajs = [t for g in groups for t in g.trajectories]
    await model.log(groups, split=split, step=step)
    right = {t.metadata["scenario_id"]: float(success(t)) for t in trajs}
    outcomes = [right.get(s.id, 0.0) for s in scenarios]
    return Evaluation(
        sum(outcomes) / len(scenarios), sum(t.reward for t in trajs) / max(len(trajs), 1), outcomes
    )


async def greedy_episodes(
    model: ChatModel, scenarios: list, desc: str, force: bool = True
) -> list[adv.TrajectoryGroup]:
    """One greedy episode per scenario, as the demo evaluates (a failed episode is counted, not raised).
    An empty `desc` shows no progress bar."""
    return await adv.gather_trajectory_groups(
        [[rollout(model, s, temperature=0.0, force_first_call=force)] for s in scenarios],
        max_exceptions=len(scenarios),
        desc=desc or "gather",
        progress=bool(desc),
    )


def held_out(seed: int, val_size: int, dev_size: int) -> tuple[list, list]:
    """The reported held-out set (`val_size`, the same list for a seed as before dev existed) and a disjoint
    dev set that picks the best step, so the reported number is not the one the choice was made on."""
    val = make_scenarios(val_size, seed=seed, split="val")
    seen = {s.question for s in val}
    pool = make_scenarios(val_size + dev_size, seed=seed, split="val")
    dev = [s for s in pool if s.question not in seen][:dev_size]
    return val, dev
