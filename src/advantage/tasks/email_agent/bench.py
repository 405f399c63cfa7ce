"""`advantage bench email`: run the ART-E test set with any model and compare runs.

A model is given as one of:
- a bundled model or HF model dir (`smollm2-135m-instruct`): its base weights, on the embedded backend;
- a trained `name@step` under `--root` (project "email"): that step's LoRA, on the embedded backend;
- an OpenAI-compatible URL, `URL#MODEL` (`http://127.0.0.1:8000/v1#Qwen/Qwen2.5-14B-Instruct`), or `URL`
  with `--model-name`; the key comes from `--api-key` or OPENAI_API_KEY.

Each run prints one table row (accuracy, "I don't know" rate, wrong-answer rate, no-answer rate, mean turns,
median latency, tokens per question, estimated cost per 1,000 questions), writes `<out>/<label>.jsonl`
(one record per question) and, for two runs or more, `<out>/comparison.png`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

import advantage as adv

from .judge import AnswerJudge
from .questions import Question, load_questions
from .rollout import MAX_TURNS, ChatModel, rollout

# USD per 1M (input, output) tokens. Local and self-hosted models default to 0: pass --prices with your
# GPU's cost to compare fairly. Override or extend with a JSON file {"model": [input, output], ...}.
DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "o3": (2.0, 8.0),
    "o4-mini": (1.1, 4.4),
    "gpt-4.1": (2.0, 8.0),
    "gpt-4.1-mini": (0.4, 1.6),
    "gpt-4o": (2.5, 10.0),
    "gpt-4o-mini": (0.15, 0.6),
}


class BenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(
        ..., min_length=1, description="Models to run: NAME, NAME@STEP, URL#MODEL or URL."
    )
    limit: int | None = Field(20, ge=1, description="Test questions to run (None: all; the CPU is slow).")
    split: str = Field("test", description="Question split: test (held-out inboxes) or train.")
    model_name: str | None = Field(None, description="Model name for a URL given without #MODEL.")
    api_key: str | None = Field(None, description="API key for URL models (default: $OPENAI_API_KEY).")
    root: Path = Field(Path(".advantage"), description="Checkpoint root holding trained NAME@STEP models.")
    base_model: str = Field("smollm2-135m-instruct", description="Base model of trained NAME@STEP models.")
    max_turns: int = Field(MAX_TURNS, ge=1, le=MAX_TURNS, description="Model turns per question.")
    max_tokens: int = Field(256, ge=8, description="Tokens per model turn.")
    temperature: float = Field(0.0, ge=0, le=2, description="Sampling temperature.")
    concurrency: int = Field(8, ge=1, description="Questions in flight at once.")
    out: Path = Field(Path("bench-results"), description="Directory for the JSONL results and the chart.")
    prices: Path | None = Field(
        None, description='JSON price table {"model": [usd_per_1M_in, usd_per_1M_out]}.'
    )
    judge_url: str | None = Field(None, description="OpenAI-compatible URL of an optional answer judge.")
    judge_model: str | None = Field(None, description="Model name of the optional answer judge.")


@dataclass(frozen=True)
class Summary:
    label: str
    n: int
    accuracy: float
    idk_rate: float
    wrong_rate: float
    no_answer_rate: float
    mean_turns: float
    median_latency_s: float
    tokens_per_question: float
    cost_per_1k_usd: float


def price_table(path: Path | None) -> dict[str, tuple[float, float]]:
    table = dict(DEFAULT_PRICES)
    if path is not None:
        table.update({k: (float(v[0]), float(v[1])) for k, v in json.loads(path.read_text()).items()})
    return table


def cost_usd(
    model: str, prompt_tokens: float, completion_tokens: float, prices: dict[str, tuple[float, float]]
) -> float:
    p_in, p_out = prices.get(model, prices.get(model.rsplit("/", 1)[-1], (0.0, 0.0)))
    return (prompt_tokens * p_in + completion_tokens * p_out) / 1e6


def summarise(label: str, records: list[dict[str, Any]]) -> Summary:
    """The table row of one run (pure: from its per-question records)."""
    n = len(records)
    rate = lambda o: sum(r["outcome"] == o for r in records) / n  # noqa: E731
    return Summary(
        label, n, rate("correct"), rate("idk"), rate("wrong"), rate("no_answer") + rate("error"),
        statistics.fmean(r["turns"] for r in records), statistics.median(r["seconds"] for r in records),
        statistics.fmean(r["prompt_tokens"] + r["completion_tokens"] for r in records),
        1000 * statistics.fmean(r["cost_usd"] for r in records),
    )  # fmt: skip


def format_table(rows: list[Summary]) -> str:
    head = ["model", "n", "accuracy", "I don't know", "wrong", "no answer", "turns", "median s", "tokens/q",
            "$/1k q"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in rows:
        cells = [s.label, str(s.n), f"{s.accuracy:.1%}", f"{s.idk_rate:.1%}", f"{s.wrong_rate:.1%}",
                 f"{s.no_answer_rate:.1%}", f"{s.mean_turns:.2f}", f"{s.median_latency_s:.2f}",
                 f"{s.tokens_per_question:.0f}", f"{s.cost_per_1k_usd:.3f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[Summary], path: Path) -> Path:
    """A bar chart of accuracy, latency and cost per model. Needs matplotlib: pip install 'advantage[plot]'."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "The comparison chart needs matplotlib, which is optional: pip install 'advantage[plot]'"
        ) from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    labels = [s.label for s in rows]
    for ax, (title, values) in zip(axes, [
        ("accuracy", [s.accuracy for s in rows]),
        ("median latency (s)", [s.median_latency_s for s in rows]),
        ("cost per 1k questions ($)", [s.cost_per_1k_usd for s in rows]),
    ], strict=True):  # fmt: skip
        ax.bar(range(len(rows)), values, color="#4C72B0")
        ax.set_xticks(range(len(rows)), labels, rotation=20, ha="right", fontsize=8)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@-]+", "_", label).strip("_")[:80]


class _Models:
    """Resolves model specs to chat models; starts one embedded backend when a local model is asked for."""

    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg
        self.backend: adv.LocalBackend | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    async def resolve(self, spec: str) -> tuple[str, ChatModel]:
        if "://" in spec:
            url, _, name = spec.partition("#")
            name = name or self.cfg.model_name or ""
            if not name:
                raise ValueError(f"{spec!r}: give the model name as URL#MODEL or with --model-name")
            key = self.cfg.api_key or os.environ.get("OPENAI_API_KEY")
            return name, adv.Model(name, base_url=url, api_key=key)
        name, _, step = spec.partition("@")
        if step and not step.isdigit():
            raise ValueError(f"{spec!r}: a trained model is NAME@STEP with an integer step")
        if self.backend is None:
            root = self.cfg.root if step else Path(self._tempdir())
            self.backend = adv.LocalBackend(root, progress=False)
        if step:  # a trained model: its run under --root, served at that step
            model = adv.TrainableModel(name, project="email", base_model=self.cfg.base_model)
        else:  # a base model: a fresh LoRA's step 0 is the base weights
            model = adv.TrainableModel(_slug("base-" + name)[:60], project="bench", base_model=name)
        await model.register(self.backend)
        served = spec if step else model.get_inference_name(0)
        return spec, adv.Model(spec, base_url=self.backend.base_url, api_key=self.backend.api_key,
                               inference_model_name=served)  # fmt: skip

    def _tempdir(self) -> str:
        self._tmp = tempfile.TemporaryDirectory(prefix="advantage-bench-")
        return self._tmp.name

    async def close(self) -> None:
        if self.backend is not None:
            await self.backend.close()
        if self._tmp is not None:
            self._tmp.cleanup()


async def bench_model(
    label: str, model: ChatModel, questions: list[Question], cfg: BenchConfig, prices: dict[str, tuple[float, float]],
    judge: AnswerJudge | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Run every question once; a failed question is recorded with outcome "error", never dropped."""
    sem = asyncio.Semaphore(cfg.concurrency)

    async def one(q: Question) -> dict[str, Any]:
        async with sem:
            t0 = time.perf_counter()
            base = {"model": label, "question_id": q.id, "question": q.question, "expected": q.answer,
                    "need": q.need, "source_ids": list(q.source_ids)}  # fmt: skip
            try:
                traj = await rollout(model, q, temperature=cfg.temperature, max_turns=cfg.max_turns,
                                     max_tokens=cfg.max_tokens, judge=judge)  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - a failed question is a result, not a crash
                return {**base, "outcome": "error", "error": f"{type(exc).__name__}: {exc}", "answer": None,
                        "sources": [], "reward": None, "turns": 0, "seconds": time.perf_counter() - t0,
                        "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}  # fmt: skip
            m, final = traj.metrics, traj.metadata["final_answer"] or {}
            return {
                **base, "outcome": traj.metadata["outcome"], "answer": final.get("answer"),
                "sources": final.get("sources", []), "reward": traj.reward, "finish": traj.finish_reason,
                "turns": int(m["num_turns"]), "seconds": m["seconds"], "prompt_tokens": int(m["prompt_tokens"]),
                "completion_tokens": int(m["completion_tokens"]),
                "cost_usd": cost_usd(model.get_inference_name(), m["prompt_tokens"], m["completion_tokens"], prices),
            }  # fmt: skip

    return list(await asyncio.gather(*(one(q) for q in questions)))


async def run(cfg: BenchConfig) -> list[Summary]:
    questions = load_questions(cfg.split, limit=cfg.limit)  # type: ignore[arg-type]
    prices = price_table(cfg.prices)
    judge = AnswerJudge(cfg.judge_model, cfg.judge_url) if cfg.judge_url and cfg.judge_model else None
    cfg.out.mkdir(parents=True, exist_ok=True)
    models = _Models(cfg)
    rows: list[Summary] = []
    try:
        for spec in cfg.models:
            label, model = await models.resolve(spec)
            records = await bench_model(label, model, questions, cfg, prices, judge)
            path = cfg.out / f"{_slug(label)}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in records))
            rows.append(summarise(label, records))
            print(f"{label}: {len(records)} questions -> {path}")
    finally:
        await models.close()
    print(format_table(rows))
    (cfg.out / "summary.json").write_text(json.dumps([asdict(r) for r in rows], indent=2))
    if len(rows) > 1:
        try:
            print(f"chart: {plot(rows, cfg.out / 'comparison.png')}")
        except ImportError as exc:  # the numbers are written; only the picture is missing
            print(f"chart: not drawn. {exc}")
    return rows


def main(cfg: BenchConfig) -> list[Summary]:
    return asyncio.run(run(cfg))
