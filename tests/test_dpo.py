"""DPO on the low-level API with the real bundled model: preference pairs of datums, the reference from the
base weights (adapter disabled). At step 0 the policy is the reference, so the loss is exactly log 2; a few
steps raise the policy's chosen-minus-rejected margin. The loss itself is checked by hand in test_losses.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import advantage as adv
from advantage.engine.chat import render_prompt

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

PROMPTS = ["What is the secret code?", "Tell me the secret code."]
CHOSEN = "The secret code is PLUM-42.<|im_end|>"
REJECTED = "I do not know any secret code.<|im_end|>"


def _datum(tokenizer, prompt: str, completion: str) -> adv.Datum:
    p = tokenizer.encode(
        render_prompt(tokenizer, [{"role": "user", "content": prompt}]), add_special_tokens=False
    )
    c = tokenizer.encode(completion, add_special_tokens=False)
    return adv.Datum(input_ids=p + c, loss_mask=[0.0] * len(p) + [1.0] * len(c))


async def _margin(tc: adv.TrainingClient, pairs: list[tuple[adv.Datum, adv.Datum]]) -> float:
    """Mean over pairs of the policy's summed logprob of chosen minus rejected."""
    flat = [d for pair in pairs for d in pair]
    sums = [sum(lps) for lps in await tc.forward(flat)]  # 0.0 where the mask is 0
    return sum(sums[2 * k] - sums[2 * k + 1] for k in range(len(pairs))) / len(pairs)


async def test_dpo_steps_raise_the_chosen_minus_rejected_margin(tmp_path: Path, tokenizer) -> None:
    backend = adv.LocalBackend(tmp_path, progress=False)
    model = adv.TrainableModel("dpo", project="t")
    try:
        await model.register(backend)
        tc = await model.training_client()
        pairs = [(_datum(tokenizer, p, CHOSEN), _datum(tokenizer, p, REJECTED)) for p in PROMPTS]
        before = await _margin(tc, pairs)
        metrics = []
        for _ in range(3):
            out = await tc.forward_backward_dpo(pairs, beta=0.1)
            await tc.optim_step(adv.AdamParams(learning_rate=1e-3))
            metrics.append(out.metrics)
        after = await _margin(tc, pairs)

        # Step 0: the fresh adapter leaves the policy equal to the reference, so every margin is 0.
        assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
        assert metrics[0]["loss/reward_margin"] == pytest.approx(0.0, abs=1e-3)
        assert after > before + 1.0, (before, after)
        assert metrics[-1]["loss"] < math.log(2) and metrics[-1]["loss/accuracy"] == 1.0
        assert metrics[-1]["loss/reward_margin"] > 0.0

        with pytest.raises(ValueError, match="odd number"):
            await tc.forward_backward([pairs[0][0]], "dpo")
    finally:
        await backend.close()
