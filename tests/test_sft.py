"""SFT on the low-level primitives: the mask covers exactly the assistant turns, and fine-tuning the real
bundled model lowers its cross-entropy on the data and changes what the served model says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import advantage as adv
from advantage.cli import app
from advantage.report.curves import build_charts
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


def test_weight_zero_turns_are_context_only(tokenizer) -> None:
    t = adv.Trajectory(
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there.", "weight": 0},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye.", "weight": 1},
        ]
    )
    tok = tokenize_for_sft(tokenizer, t, max_len=512)
    trained = tokenizer.decode([i for i, m in zip(tok.input_ids, tok.assistant_mask, strict=True) if m])
    assert "Goodbye." in trained and "Hello there." not in trained
    assert "Hello there." in tokenizer.decode(tok.input_ids)  # still in the context
    assert "weight" not in tokenizer.decode(tok.input_ids)
    all_zero = adv.Trajectory(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x", "weight": 0}]
    )
    with pytest.raises(ValueError, match="all with weight 0"):
        tokenize_for_sft(tokenizer, all_zero, 512)


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
        rows = [
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ANSWER}]}
            for q in QUESTIONS
        ]
        data = _write_jsonl(tmp_path / "d.jsonl", rows)
        with pytest.raises(
            ValueError, match=r"4 trajectories cannot[\s\S]*d\.jsonl, line 2: .* over the limit of 16"
        ):
            await model.train_sft(data, adv.SFTConfig(max_seq_len=16))  # every line is checked, none trains
        assert await model.get_step() == 0
        tc = await model.training_client()
        datums = await tc.sft_datums(_trajectories())
        ce_before = _mean_ce(datums, await tc.forward(datums))

        result = await model.train_sft(
            _trajectories(), adv.SFTConfig(learning_rate=2e-3, epochs=6, batch_size=4)
        )
        assert result.step == 6 and model.get_inference_name() == "sft@6"  # a step per optimizer step
        ce_after = _mean_ce(datums, await tc.forward(datums))
        assert result.metrics["sft/loss_last"] < result.metrics["sft/loss_first"]
        assert ce_after < 0.5 * ce_before, (ce_before, ce_after)
        after = await greedy()
        assert "PLUM-42" not in before and "PLUM-42" in after, (before, after)
    finally:
        await backend.close()


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sft_cli_refuses_a_bad_file_naming_the_line(tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    data.write_text(json.dumps(good) + "\n" + '{"messages": [{"role": "user", "content": "Hi"}]}\n')
    res = CliRunner().invoke(app, ["sft", str(data), "--model", "m", "--root", str(tmp_path / "root")])
    assert res.exit_code == 1
    assert f"{data}, line 2: has no assistant message to train on" in res.output
    assert not (tmp_path / "root").exists()  # refused before any model loaded or any step


@pytest.mark.integration
def test_sft_cli_trains_and_logs_train_and_val_loss_per_step(tmp_path: Path) -> None:
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ANSWER}]}
        for q in QUESTIONS[:2]
    ]
    data = _write_jsonl(tmp_path / "train.jsonl", rows)
    args = ["sft", str(data), "--model", "cli-sft", "--project", "p", "--root", str(tmp_path / "root")]
    args += ["--val", str(data), "--epochs", "2", "--batch-size", "2", "--learning-rate", "2e-3"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "cli-sft@2: 2 steps" in res.output
    run_dir = tmp_path / "root" / "p" / "models" / "cli-sft"
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in metrics if r["split"] == "train"]
    val = [(r["step"], r["val/loss"]) for r in metrics if r["split"] == "val"]
    assert [s for s, _ in train] == [1, 2] and [s for s, _ in val] == [0, 1, 2]
    assert val[2][1] < val[0][1]  # the loss on the (repeated) data went down
    assert (run_dir / "0002").is_dir()
    loss_chart = next(c for c in build_charts(metrics, None) if c.title == "Loss")
    assert {s.split for s in loss_chart.series} == {"train", "val"}
