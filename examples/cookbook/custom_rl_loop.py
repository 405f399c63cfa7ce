"""A custom RL loop written only with the low-level API: sample, score, build datums, your own loss, step.

The task is the single-turn tool-call task (src/advantage/tasks/tool_use/single_turn.py). Everything a high-level
`model.train` does is spelled out here, so each piece can be changed: group-normalised advantages, the
datums (prompt tokens masked out, the sampler's logprobs kept for the importance ratio), and the loss, a
hand-written CISPO-style objective with a length-normalised per-sequence mean, which runs on the backend
through its gradient with respect to the logprobs (so it works the same against `advantage serve`).

    python -m examples.cookbook.custom_rl_loop --steps 4
    python -m examples.cookbook.custom_rl_loop --backend http://gpu-box:7999 --steps 20
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import torch

import advantage as adv
from advantage.tasks.tool_use import single_turn
from advantage.tasks.tool_use.env import make_scenarios


def my_loss(datums: list[adv.Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """−mean over sequences of (A · mean over its tokens of sg(min(ρ, 2)) · logp): CISPO's clipped
    importance weight with a per-sequence mean (GRPO's aggregation) instead of a token mean."""
    terms, ratios = [], []
    for d, lp in zip(datums, logprobs, strict=True):
        mask = torch.tensor(d.loss_mask)
        old = torch.tensor(d.logprobs or [0.0] * len(mask))
        ratio = torch.exp((lp - old) * mask).detach()  # 1.0 where masked out
        weight = ratio.clamp(max=2.0)
        terms.append(-d.advantage * (weight * lp * mask).sum() / mask.sum())
        ratios.append(float((ratio * mask).sum() / mask.sum()))
    return torch.stack(terms).mean(), {"ratio_mean": statistics.fmean(ratios)}


def group_datums(
    prompt_ids: list[int], seqs: list[adv.SampledSequence], rewards: list[float]
) -> list[adv.Datum]:
    """One datum per completion with its group-normalised advantage; none when the group has no signal."""
    mean, std = statistics.fmean(rewards), statistics.pstdev(rewards)
    if std < 1e-6:
        return []
    p = len(prompt_ids)
    return [
        adv.Datum(
            input_ids=prompt_ids + s.tokens,
            loss_mask=[0.0] * p + [1.0] * len(s.tokens),
            advantage=(r - mean) / std,
            logprobs=[0.0] * p + s.logprobs,
        )
        for s, r in zip(seqs, rewards, strict=True)
    ]


async def main(
    steps: int, groups: int, group_size: int, lr: float, backend_url: str | None, root: str
) -> list[float]:
    backend = adv.RemoteBackend(backend_url) if backend_url else adv.LocalBackend(root, progress=False)
    model = adv.TrainableModel("custom-loop", project="cookbook")
    await model.register(backend)
    tc = await model.training_client()
    curve = []
    try:
        for step in range(steps):
            t0 = time.perf_counter()
            scenarios = make_scenarios(groups, seed=1000 + step, split="train")
            samples = await asyncio.gather(
                *(
                    tc.sample(
                        single_turn.prompt(s),
                        tools=single_turn.TOOLS,
                        n=group_size,
                        max_tokens=48,
                        temperature=0.7,
                    )
                    for s in scenarios
                )
            )
            batch, rewards = [], []
            for s, out in zip(scenarios, samples, strict=True):
                rs = [single_turn.reward(seq.text, s) for seq in out.sequences]
                rewards += rs
                batch += group_datums(out.prompt_tokens, out.sequences, rs)
            mean_reward = statistics.fmean(rewards)
            curve.append(mean_reward)
            if batch:  # every group tied: nothing to learn this step
                fb = await tc.forward_backward(batch, my_loss)
                stepped = await tc.optim_step(adv.AdamParams(learning_rate=lr))
                name = await tc.save_weights({"reward": mean_reward, **fb.metrics, **stepped})
            else:
                name = model.get_inference_name()
            print(
                f"step {step}: reward {mean_reward:.3f}  datums {len(batch)}  -> {name}  ({time.perf_counter() - t0:.0f} s)"
            )
    finally:
        await backend.close()
    return curve


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--groups", type=int, default=4, help="Scenarios per step.")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=7e-4)
    ap.add_argument("--backend", default=None, help="URL of `advantage serve` (default: embedded, on CPU).")
    ap.add_argument("--root", default=".advantage", help="Checkpoint root of the embedded backend.")
    a = ap.parse_args()
    asyncio.run(main(a.steps, a.groups, a.group_size, a.lr, a.backend, a.root))
