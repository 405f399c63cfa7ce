"""SFT on the low-level primitives: the mask covers exactly the assistant turns, and fine-tuning the real
bundled model lowers its cross-entropy on the data and changes what the served model says."""

from __future__ import annotations

from pathlib import Path

import pytest

import advantage as adv
from advantage.training.tokenize import tokenize_for_sft

QUESTIONS = [
    "What is the secret code?",
    "Tell me the secret code.",
    "What's the secret code?",
    "Please give me the secret code.",
]
ANSWER = "The secret code is PLUM-42."


def _trajectories() -> list[adv.Trajectory]:
    return [
        adv.Trajectory([{"role": "user", "content": q}, {"role": "assistant", "content": ANSWER}], reward=1.0)
        for q in QUESTIONS
    ]


def test_sft_mask_covers_the_assistant_turns_only(tokenizer) -> None:
    t = adv.Trajectory(
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there."},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye."},
        ],
        reward=0.0,
    )
    tok = tokenize_for_sft(tokenizer, t, max_len=512)
    trained = [tokenizer.decode([i for i, m in zip(tok.input_ids, tok.assistant_mask, strict=True) if m])]
    assert "Hello there." in trained[0] and "Goodbye." in trained[0]
    assert "Hi" not in trained[0] and "Bye" not in trained[0] and "user" not in trained[0]
    assert trained[0].count("<|im_end|>") == 2  # the end-of-turn marker is trained: the model learns to stop
    assert len(tok.choice_spans) == 2
    with pytest.raises(ValueError, match="no assistant message"):
        tokenize_for_sft(tokenizer, adv.Trajectory([{"role": "user", "content": "Hi"}], reward=0.0), 512)
    with pytest.raises(ValueError, match="over the limit"):
        tokenize_for_sft(tokenizer, t, max_len=8)


def _mean_ce(datums: list[adv.Datum], logprobs: list[list[float]]) -> float:
    vals = [
        -lp
        for d, lps in zip(datums, logprobs, strict=True)
        for lp, m in zip(lps, d.loss_mask, strict=True)
        if m
    ]
    return sum(vals) / len(vals)


@pytest.mark.integration
async def test_sft_lowers_cross_entropy_and_changes_served_outputs(tmp_path: Path) -> None:
    backend = adv.LocalBackend(tmp_path, progress=False)
    model = adv.TrainableModel("sft", project="t")
    try:
        await model.register(backend)
        client = model.openai_client()
        ask = [{"role": "user", "content": "What is the secret code?"}]

        async def greedy() -> str:
            r = await client.chat.completions.create(
                model=model.get_inference_name(), messages=ask, max_tokens=16, temperature=0.0
            )
            return r.choices[0].message.content or ""

        before = await greedy()
        tc = await model.training_client()
        datums = await tc.sft_datums(_trajectories())
        ce_before = _mean_ce(datums, await tc.forward(datums))

        result = await model.train_sft(
            _trajectories(), adv.SFTConfig(learning_rate=2e-3, epochs=6, batch_size=4)
        )
        assert result.step == 1 and model.get_inference_name() == "sft@1"
        ce_after = _mean_ce(datums, await tc.forward(datums))
        assert result.metrics["sft/loss_last"] < result.metrics["sft/loss_first"]
        assert ce_after < 0.5 * ce_before, (ce_before, ce_after)
        after = await greedy()
        assert "PLUM-42" not in before and "PLUM-42" in after, (before, after)
    finally:
        await backend.close()
