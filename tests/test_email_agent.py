"""The email agent end to end: the rollout loop (scripted), then the CPU recipe and `advantage bench email`
with the real bundled model through the real server on 127.0.0.1 (short: tiny groups, few tokens)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from openai.types.chat import ChatCompletion

from advantage.tasks.email_agent import rollout
from advantage.tasks.email_agent.questions import load_questions

Q = next(q for q in load_questions("test") if q.need == "search" and q.kind == "text")


def _completion(content: str, call: tuple[str, dict[str, Any] | str] | None = None) -> ChatCompletion:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if call is not None:
        args = call[1] if isinstance(call[1], str) else json.dumps(call[1])
        message["tool_calls"] = [
            {"id": "call_1", "type": "function", "function": {"name": call[0], "arguments": args}}
        ]
    return ChatCompletion.model_validate({
        "id": "c", "object": "chat.completion", "created": 0, "model": "agent@0",
        "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110},
        "choices": [{"index": 0, "finish_reason": "tool_calls" if call else "stop", "message": message,
                     "token_ids": [1], "token_logprobs": [-0.1], "prompt_token_ids": [2],
                     "weights": {"model": "agent", "step": 0}}],
    })  # fmt: skip


class ScriptedModel:
    def __init__(self, script: list[ChatCompletion]) -> None:
        self.script, self.requests = list(script), []
        self.chat = self.completions = self

    async def create(self, **kwargs: Any) -> ChatCompletion:
        self.requests.append(kwargs)
        return self.script.pop(0)

    def openai_client(self) -> Any:
        return self

    def get_inference_name(self) -> str:
        return "agent@0"


async def test_rollout_search_read_answer() -> None:
    src = Q.source_ids[0]
    model = ScriptedModel([
        _completion("", ("search_inbox", {"keywords": " ".join(Q.question.split()[-3:])})),
        _completion("", ("read_email", {"message_id": src})),
        _completion("", ("return_final_answer", {"answer": str(Q.answer), "sources": [src]})),
    ])  # fmt: skip
    traj = await rollout.rollout(model, Q, temperature=0.0)
    assert traj.finish_reason == "answered" and traj.metadata["outcome"] == "correct"
    assert traj.reward == pytest.approx(1.0 + 0.3 + 0.1 + 0.1 * (1 - 3 / 10))
    assert traj.metrics["prompt_tokens"] == 300 and traj.metrics["num_turns"] == 3
    assert traj.messages()[-3]["content"].startswith(f"Message-ID: {src}")
    first = model.requests[0]["messages"]
    assert first[-1] == {"role": "user", "content": Q.question}
    assert all(
        "Message-ID: " + src not in str(m.get("content")) for m in first
    )  # the inbox is never in the prompt


async def test_rollout_survives_bad_calls_and_runs_out_of_turns() -> None:
    model = ScriptedModel([
        _completion("", ("read_email", {"message_id": "nope"})),
        _completion("", ("search_inbox", '{"keywords": ')),
        _completion("", ("delete_everything", {})),
    ])  # fmt: skip
    traj = await rollout.rollout(model, Q, max_turns=3)
    assert traj.finish_reason == "max_turns" and traj.metadata["outcome"] == "no_answer"
    tool_msgs = [m["content"] for m in traj.messages() if m["role"] == "tool"][-3:]
    assert all(c.startswith("Error: ") for c in tool_msgs)
    assert traj.reward == pytest.approx(0.0) and traj.metrics["tool_errors"] == 3


async def test_rollout_plain_text_is_a_format_error() -> None:
    traj = await rollout.rollout(ScriptedModel([_completion("The answer is 42.")]), Q)
    assert traj.finish_reason == "no_tool_call" and traj.reward == pytest.approx(-1.9)


async def test_rollout_bad_final_arguments() -> None:
    model = ScriptedModel([_completion("", ("return_final_answer", {"answer": ["x"], "sources": []}))])
    traj = await rollout.rollout(model, Q)
    assert traj.finish_reason == "bad_final_args" and traj.reward == pytest.approx(-1.8)


# ------------------------------------------------------------------------- real model, real server


@pytest.mark.integration
def test_cpu_recipe_smoke(tmp_path: Path) -> None:
    from advantage.tasks.email_agent.train import EmailTrainConfig, main

    result = main(EmailTrainConfig(root=tmp_path, steps=2, groups_per_step=1, group_size=2, max_turns=2,
                                   max_tokens=40))  # fmt: skip
    assert result["steps"] == 2.0 and result["seconds_per_step"] > 0
    assert (tmp_path / "email" / "models" / "email-agent-001").is_dir()


@pytest.mark.integration
def test_bench_command_with_the_bundled_model(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from advantage.cli import app

    out = tmp_path / "bench"
    args = ["bench", "email", "--model", "smollm2-135m-instruct", "--model", "smollm2-135m-instruct@0",
            "--root", str(tmp_path / "root"), "--limit", "2", "--max-turns", "2", "--max-tokens", "32",
            "--out", str(out)]  # fmt: skip
    # smollm2-135m-instruct@0 is "a trained name@step" only if such a run exists: make one (step 0 = base).
    import asyncio

    import advantage as adv

    async def make_run() -> None:
        backend = adv.LocalBackend(tmp_path / "root", progress=False)
        await adv.TrainableModel("smollm2-135m-instruct", project="email").register(backend)
        await backend.close()

    asyncio.run(make_run())
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and "I don't know" in result.output
    records = [json.loads(line) for line in (out / "smollm2-135m-instruct.jsonl").read_text().splitlines()]
    assert len(records) == 2 and {"outcome", "turns", "seconds", "prompt_tokens", "cost_usd"} <= set(
        records[0]
    )
    assert (out / "comparison.png").stat().st_size > 1000


def test_the_bench_chart_names_the_plot_extra_without_matplotlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from advantage.tasks.email_agent.bench import Summary, plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises, as when not installed
    row = Summary("m", 1, 1.0, 0.0, 0.0, 0.0, 1.0, 0.1, 10.0, 0.0)
    with pytest.raises(ImportError, match=r"pip install 'advantage\[plot\]'"):
        plot([row, row], tmp_path / "comparison.png")
