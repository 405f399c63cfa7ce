"""`Model` (a prompted model at any OpenAI-compatible URL) and `TrainableModel` (a LoRA trained on a
backend). Both hand out a real `openai.AsyncOpenAI`, so baselines and trained models run through the same
rollout code."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import openai

from advantage.backends.base import Backend, TrainResult
from advantage.config import LoRAConfig, OnlineConfig, SFTConfig, TrainConfig
from advantage.lowlevel import TrainingClient
from advantage.online.feedback import FeedbackResult
from advantage.trajectory import TrajectoryGroup
from advantage.wire.ops import ModelSpec, RestoreRequest

if TYPE_CHECKING:
    import asyncio

    from advantage.online.trainer import Evaluate, OnlineResult, OnStep
    from advantage.rewards.ruler import RulerJudge
    from advantage.sft import SFTData


class Model:
    """A model served anywhere that speaks the OpenAI chat API (OpenAI, vLLM, our own server...)."""

    def __init__(
        self,
        name: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        inference_model_name: str | None = None,
        project: str = "default",
        timeout: float = 600.0,
    ) -> None:
        self.name = name
        self.project = project
        self.base_url = base_url
        self.api_key = api_key
        self.inference_model_name = inference_model_name or name
        self.timeout = timeout
        self._client: openai.AsyncOpenAI | None = None

    def openai_client(self) -> openai.AsyncOpenAI:
        if self._client is None:
            self._client = openai.AsyncOpenAI(
                base_url=self.base_url, api_key=self.api_key or "unused", timeout=self.timeout, max_retries=2
            )
        return self._client

    def get_inference_name(self) -> str:
        return self.inference_model_name


class TrainableModel(Model):
    """A LoRA on `base_model`, trained with GRPO on a backend and served by it after every step."""

    def __init__(
        self,
        name: str,
        *,
        project: str = "default",
        base_model: str = "smollm2-135m-instruct",
        lora: LoRAConfig | None = None,
        fork_from: str | None = None,
        record_traffic: bool = False,
        background_samples: int = 0,
    ) -> None:
        """`fork_from`: start from another model's checkpoint instead of the base weights. `"other@3"` (or
        `"other"` for its latest step, or `"project/other@3"` in another project) becomes this model's step 0,
        adapter and optimizer state both, when it is first registered; it needs the same base model and LoRA
        shape. Registering it again resumes it.

        `record_traffic`: the backend records every chat completion this model serves (the request, each
        choice's sampled token ids and logprobs, the weights step, the caller's `metadata` and `user`) in a
        SQLite store in its run dir, so that `feedback` can rate them (see `advantage.online`).

        `background_samples` (needs `record_traffic`): the backend samples this many more choices for each
        request it serves (in the same batch, from the same prompt and parameters) and records them beside
        the caller's, never returned, so that every request is a group once the online trainer's judge
        (`OnlineConfig.judge_model`) scores it (see `advantage.server.background`)."""
        super().__init__(name, project=project)
        self.base_model = base_model
        self.lora = lora or LoRAConfig()
        self.fork_from = fork_from
        self.record_traffic = record_traffic
        self.background_samples = background_samples
        _ = self.spec  # built (so checked) now: a bad setting fails here, not at register
        self._backend: Backend | None = None
        self._step = 0
        self.restored_from: int | None = None  # the step the last `restore` went back to

    @property
    def spec(self) -> ModelSpec:
        """What a backend needs to know of this model: the record every backend call takes."""
        return ModelSpec(
            project=self.project,
            name=self.name,
            base_model=self.base_model,
            lora=self.lora,
            fork_from=self.fork_from,
            record_traffic=self.record_traffic,
            background_samples=self.background_samples,
        )

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            raise RuntimeError(
                f"{self.name!r} is not registered: call `await model.register(backend)` first."
            )
        return self._backend

    async def register(self, backend: Backend) -> None:
        self._backend = backend
        self._step = await backend.register(self.spec)
        self.base_url, self.api_key = backend.base_url, backend.api_key
        self._client = None

    def get_inference_name(self, step: int | None = None) -> str:
        """`name@step`: the explicit weight version (defaults to the latest step)."""
        return f"{self.name}@{self._step if step is None else step}"

    async def get_step(self) -> int:
        self._step = await self.backend.get_step(self.spec)
        return self._step

    async def train(self, groups: list[TrajectoryGroup], config: TrainConfig | None = None) -> TrainResult:
        """One GRPO step on `groups`; returns the new step, which is served before this returns."""
        result = await self.backend.train(self.spec, list(groups), config or TrainConfig())
        self._step = result.step
        return result

    async def feedback(
        self,
        completion_id: str,
        *,
        reward: float | None = None,
        label: str | None = None,
        choice: int = 0,
        comment: str | None = None,
    ) -> FeedbackResult:
        """Rate a recorded completion's choice: a `reward`, or a `label` ("up"/"good" -> 1.0, "down"/"bad"
        -> 0.0). A second call for the same choice replaces the first. When the completion's request carried
        `metadata={"episode": E}`, every completion recorded with that episode gets it too. The rules are in
        `advantage.online.feedback`; bad input (unknown id, non-finite reward, choice out of range) raises
        a ValueError that says what to send."""
        body: dict[str, Any] = {
            "completion_id": completion_id,
            "choice": choice,
            "reward": reward,
            "label": label,
        }
        if comment is not None:
            body["comment"] = comment
        return FeedbackResult(**await self.backend.feedback(self.spec, body))

    async def train_online(
        self,
        config: OnlineConfig | None = None,
        *,
        evaluate: Evaluate | None = None,
        stop: asyncio.Event | None = None,
        judge: RulerJudge | None = None,
        on_step: OnStep | None = None,
    ) -> OnlineResult:
        """Keep training on this model's recorded, rated traffic until `stop` is set (or `config.max_steps`
        / `config.max_seconds`): one step whenever `config.min_groups` groups are ready, each promoted to the
        default served weights only if `await evaluate("name@step")` scores it no worse than the default by
        more than `config.tolerance` (or, with `config.golden_set`, if the recorded golden set's answers are
        no less likely per token by more than that; every step, without either). Returns the steps, promoted
        or rejected. With `config.judge_model` (or a `judge` of your own, say with another rubric), a RULER
        judge scores the recorded requests' choices that have no feedback (`advantage.online.judging`).
        `on_step(step)` is called as each step is judged. The rules, guards and crash safety are in
        `advantage.online.trainer`."""
        from advantage.online.trainer import train_online

        return await train_online(self, config, evaluate=evaluate, stop=stop, judge=judge, on_step=on_step)

    async def log(
        self, groups: list[TrajectoryGroup], split: str = "val", *, step: int | None = None
    ) -> dict[str, Any]:
        """Record evaluation groups (metrics `<split>/reward` etc., and the trajectories) at `step`: the step
        whose weights (`get_inference_name(step)`) the groups came from, when a later step has been trained
        since (an evaluation run beside the next update); default, the latest step. (W&B, if on, drops a row
        logged at an earlier step than it has seen; metrics.jsonl keeps every row.)"""
        return await self.backend.log(self.spec, list(groups), split, step)

    async def delete_checkpoints(self, keep: str = "best+latest", metric: str = "val/reward") -> list[int]:
        """Delete checkpoints except the latest and the best by `metric`; returns the deleted steps."""
        return await self.backend.delete_checkpoints(self.spec, keep, metric)

    async def restore(self, step: int | None = None, metric: str = "val/reward") -> int:
        """Go back to an earlier step: its weights (and optimizer state) become a new latest step, served at
        once and trained on from there; the steps in between stay on disk. `step=None` picks the best step
        by `metric` (as logged by `model.log`). Returns the new step; `restored_from` is in metrics.jsonl."""
        out = await self.backend.restore(self.spec, RestoreRequest(step=step, metric=metric))
        self._step = out.step
        self.restored_from = out.restored_from
        return self._step

    async def training_client(self) -> TrainingClient:
        """The trainer's primitives for this model: forward_backward, optim_step, sample, save_weights."""
        return TrainingClient(self.backend, self.spec, on_save=self._saved)

    def _saved(self, step: int) -> None:
        self._step = step

    async def train_sft(
        self, data: SFTData, config: SFTConfig | None = None, *, val: SFTData | None = None
    ) -> TrainResult:
        """Supervised fine-tuning: cross-entropy on the assistant turns of `data` (trajectories from any model,
        or a JSONL file in OpenAI's chat fine-tuning format), every step a checkpoint served at once, with the
        train loss and, given `val` or `config.val_fraction`, the validation loss in metrics.jsonl. Built on
        the low-level primitives (`advantage.sft`)."""
        from advantage.sft import train_sft

        metrics = await train_sft(await self.training_client(), data, config, val)
        return TrainResult(await self.get_step(), metrics)
