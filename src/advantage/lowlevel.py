"""The low-level training API (Tinker-style): your own loss, your own loop, on any backend.

    tc = await model.training_client()
    batch = await tc.datums_from_groups(groups)            # or build Datums from your own token ids
    out = await tc.forward_backward(batch, "cispo")        # or any callable loss (below)
    await tc.optim_step(adv.AdamParams(learning_rate=1e-4))
    name = await tc.save_weights()                         # "my-model@4", served at once
    res = await tc.sample(messages_or_token_ids, n=4, max_tokens=64)
    lps = await tc.compute_logprobs(batch, model="teacher@12")   # any served weights: a teacher's scores

Gradients accumulate over `forward_backward` calls until `optim_step`. `model.train` runs these same
primitives (tokenize -> forward_backward -> optim_step -> save), so mixing both is fine between steps, but
not while gradients are accumulated and not yet stepped.

**Custom losses**, also on a remote backend: `loss_fn(datums, logprobs) -> loss` or `(loss, metrics)`,
where `logprobs[i]` is a float32 tensor with one value per `datums[i].input_ids` position (0.0 where the
loss mask is 0). The backend computes the logprobs (`forward`), this process computes the loss and
d(loss)/d(logprobs) with torch autograd, and sends those gradients back; the backend backpropagates them
through the model (the built-in "linear" loss Σ w·logp). The result is the same update as running the loss
on the backend, locally and remotely alike, at the cost of one extra forward pass.

**Per-token advantages**: a datum with `extras["advantages"]` (one value per input id) trains the built-in
policy losses ("cispo", "ppo", "grpo", "importance_sampling") with each token's own advantage instead of
its `advantage`. On-policy distillation (`advantage.distill`) is built on it.

Every call is a typed method of the backend (`Backend.forward_backward(spec, request)`, ...), with its
request and reply records in `advantage.wire.ops`, so LocalBackend and RemoteBackend run exactly the same
code path on the server side (`advantage.service_ops`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from advantage.backends.base import Backend
from advantage.config import AdamParams, LossConfig, LossName, TrainConfig
from advantage.trajectory import Message, Trajectory, TrajectoryGroup
from advantage.wire.datum import ADV_KEY, GRAD_KEY, Datum
from advantage.wire.ops import (
    LINEAR,
    DatumsRequest,
    ForwardBackwardOutput,
    ForwardBackwardRequest,
    ForwardRequest,
    LogMetricsRequest,
    LogprobsReply,
    LogprobsRequest,
    ModelSpec,
    OptimStepRequest,
    SampledSequence,
    SampleOutput,
    SampleRequest,
    SaveWeightsRequest,
    SFTDatumsRequest,
)

if TYPE_CHECKING:
    import torch

CustomLoss = Callable[[list[Datum], list["torch.Tensor"]], Any]
__all__ = [
    "ADV_KEY",
    "GRAD_KEY",
    "AdamParams",
    "CustomLoss",
    "Datum",
    "ForwardBackwardOutput",
    "SampleOutput",
    "SampledSequence",
    "TrainingClient",
]


def __getattr__(name: str) -> Any:
    if name == "BUILTIN_LOSSES":  # deprecated for one release: the names are `advantage.config.LossName`
        import warnings

        warnings.warn(
            "advantage.lowlevel.BUILTIN_LOSSES is deprecated; use typing.get_args(advantage.config.LossName).",
            DeprecationWarning,
            stacklevel=2,
        )
        return _loss_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _loss_names() -> tuple[str, ...]:
    import typing

    def flat(t: Any) -> list[str]:
        return [x for a in typing.get_args(t) for x in (flat(a) if typing.get_args(a) else [a])]

    return tuple(flat(LossName))


class TrainingClient:
    """The trainer's primitives for one registered `TrainableModel` (get one with
    `await model.training_client()`)."""

    def __init__(
        self, backend: Backend, spec: ModelSpec, on_save: Callable[[int], None] | None = None
    ) -> None:
        """`on_save(step)` is told each new step `save_weights` makes (the model keeps its step with it)."""
        self.backend = backend
        self.spec = spec
        self._on_save = on_save

    async def datums_from_groups(
        self,
        groups: Sequence[TrajectoryGroup],
        config: TrainConfig | None = None,
        *,
        skip_zero_variance: bool = True,
    ) -> list[Datum]:
        """What `model.train` trains on: group advantages, tokenized on the exact sampled ids (with the
        sampler's logprobs). Groups with equal rewards carry no signal and give no datums, unless
        `skip_zero_variance=False` (for a loss that does not use the reward, such as distillation's)."""
        req = DatumsRequest(
            groups=[g.to_record() for g in groups],
            config=config or TrainConfig(),
            skip_zero_variance=skip_zero_variance,
        )
        return (await self.backend.datums(self.spec, req)).datums

    async def sft_datums(
        self,
        trajectories: Sequence[Trajectory],
        max_seq_len: int = 2048,
        on_overflow: str = "error",
        where: Sequence[str] | None = None,
    ) -> list[Datum]:
        """Cross-entropy datums: every assistant turn's rendered text is trained (any model's output), except
        assistant messages with `"weight": 0`. Every trajectory is checked before any error is raised; the
        error names each bad one by `where` (e.g. "data.jsonl, line 7"), else by its index."""
        req = SFTDatumsRequest.model_validate(
            {
                "trajectories": [t.to_dict() for t in trajectories],
                "max_seq_len": max_seq_len,
                "on_overflow": on_overflow,
                "where": None if where is None else list(where),
            }
        )
        return (await self.backend.sft_datums(self.spec, req)).datums

    async def forward(self, batch: Sequence[Datum], micro_batch_size: int = 8) -> list[list[float]]:
        """The current weights' per-token logprobs, without gradients."""
        req = ForwardRequest(datums=list(batch), micro_batch_size=micro_batch_size)
        return (await self.backend.forward(self.spec, req)).logprobs

    async def compute_logprobs(
        self, sequences: Sequence[Datum] | Sequence[Sequence[int]], model: str | None = None
    ) -> list[list[float]]:
        """Per-token logprobs of whole token sequences (Datums' input_ids, or lists of ids) under the served
        weights `model`: `out[i][j]` = log p(ids[j] | ids[:j]), 0.0 at j = 0, computed as the sampler
        computes its logprobs (no temperature). `model` is any model the backend serves that shares this
        model's tokenizer: a step of another model (`"teacher@12"`), its latest step (`"teacher"`), a base
        model; default: this model's latest step. No gradients, and the training thread is not used."""
        return (await self._logprobs(sequences, model, 0)).logprobs

    async def compute_top_logprobs(
        self, sequences: Sequence[Datum] | Sequence[Sequence[int]], top_k: int = 20, model: str | None = None
    ) -> LogprobsReply:
        """`compute_logprobs`, and at each position the `top_k` tokens `model` finds most likely there, with
        their logprobs: `reply.top_ids[i][j]`, `reply.top_logprobs[i][j]` (most likely first; empty at j = 0).
        A teacher's distribution at the states a student reached: `advantage.distill.topk_datums` turns it
        into soft targets for the "distill_topk" loss."""
        if top_k < 1:
            raise ValueError(
                f"top_k is {top_k}; ask for at least 1 token per position (compute_logprobs: none)."
            )
        return await self._logprobs(sequences, model, top_k)

    async def _logprobs(
        self, sequences: Sequence[Datum] | Sequence[Sequence[int]], model: str | None, top_k: int
    ) -> LogprobsReply:
        if not sequences:
            raise ValueError("compute_logprobs() got no sequences; pass at least one.")
        ids = [list(s.input_ids) if isinstance(s, Datum) else [int(t) for t in s] for s in sequences]
        return await self.backend.logprobs(
            self.spec, LogprobsRequest(sequences=ids, model=model, top_k=top_k)
        )

    async def forward_backward(
        self,
        batch: Sequence[Datum],
        loss_fn: LossName | CustomLoss = "cispo",
        loss_config: LossConfig | dict[str, Any] | None = None,
        micro_batch_size: int = 8,
    ) -> ForwardBackwardOutput:
        """Accumulate the gradient of `loss_fn` over `batch`. `loss_fn` is a built-in name (with its knobs
        in `loss_config`: eps, eps_high, cispo_eps_max, agg, kl_beta, dpo_beta) or a callable (module
        docstring). "dpo" takes preference pairs laid out chosen, rejected, chosen, rejected, ...
        (`forward_backward_dpo` does that for you)."""
        if not batch:
            raise ValueError("forward_backward() got an empty batch; pass at least one Datum.")
        if callable(loss_fn):
            return await self._custom(list(batch), loss_fn, micro_batch_size)
        if loss_fn not in _loss_names():
            raise ValueError(f"Unknown loss {loss_fn!r}: use one of {_loss_names()} or pass a callable.")
        req = ForwardBackwardRequest(
            datums=list(batch),
            loss=loss_fn,
            loss_config=LossConfig.model_validate(loss_config or {}),
            micro_batch_size=micro_batch_size,
        )
        return await self.backend.forward_backward(self.spec, req)

    async def forward_backward_dpo(
        self, pairs: Sequence[tuple[Datum, Datum]], beta: float = 0.1, micro_batch_size: int = 8
    ) -> ForwardBackwardOutput:
        """Accumulate the DPO gradient of preference pairs `(chosen, rejected)`, e.g. two completions of one
        prompt with the preferred one first; each datum's loss mask covers its completion. The reference
        logprobs are the base weights' (the adapter disabled), computed on the backend. Metrics: loss,
        loss/reward_margin (β times the policy-minus-reference margin), loss/accuracy (pairs ranked right)."""
        if not pairs:
            raise ValueError("forward_backward_dpo() got no pairs; pass at least one (chosen, rejected).")
        batch = [d for pair in pairs for d in pair]
        return await self.forward_backward(batch, "dpo", LossConfig(dpo_beta=beta), micro_batch_size)

    async def _custom(
        self, batch: list[Datum], loss_fn: CustomLoss, micro_batch_size: int
    ) -> ForwardBackwardOutput:
        import torch

        logprobs = await self.forward(batch, micro_batch_size)
        leaves = [torch.tensor(lp, dtype=torch.float32, requires_grad=True) for lp in logprobs]
        out = loss_fn(batch, leaves)
        loss, metrics = out if isinstance(out, tuple) else (out, {})
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise TypeError("A custom loss must return a scalar torch tensor (or (tensor, metrics)).")
        if not torch.isfinite(loss):
            raise ValueError(f"The custom loss is {float(loss)}; refusing to send a non-finite gradient.")
        loss.backward()
        grads = [(t.grad if t.grad is not None else torch.zeros_like(t)).tolist() for t in leaves]
        # Built anew (not model_copy), so each gradient is checked like any datum's extras.
        linear = [
            Datum.model_validate({**d.model_dump(), "extras": {**d.extras, GRAD_KEY: g}})
            for d, g in zip(batch, grads, strict=True)
        ]
        req = ForwardBackwardRequest(datums=linear, loss=LINEAR, micro_batch_size=micro_batch_size)
        result = await self.backend.forward_backward(self.spec, req)
        merged = {
            **result.metrics,
            **{k: float(v) for k, v in metrics.items()},
            "loss": float(loss.detach()),
        }
        return ForwardBackwardOutput(logprobs=logprobs, metrics=merged)

    async def optim_step(self, adam: AdamParams | None = None) -> dict[str, float]:
        """One AdamW step on the accumulated gradients, which are then cleared. Returns {"grad_norm": ...}."""
        return (await self.backend.optim_step(self.spec, OptimStepRequest(adam=adam or AdamParams()))).metrics

    async def save_weights(self, metrics: dict[str, float] | None = None, split: str = "train") -> str:
        """Checkpoint the adapter as the next step and serve it at once; returns its `name@step`. `metrics`
        are logged at that step under `split`."""
        req = SaveWeightsRequest(metrics=metrics or {}, split=split)
        reply = await self.backend.save_weights(self.spec, req)
        if self._on_save is not None:
            self._on_save(reply.step)
        return reply.name

    async def log_metrics(self, metrics: dict[str, float], split: str = "val") -> int:
        """Record `metrics` under `split` at the latest step (e.g. a validation loss); returns that step."""
        return (
            await self.backend.log_metrics(self.spec, LogMetricsRequest(metrics=metrics, split=split))
        ).step

    async def sample(
        self,
        prompt: Sequence[int] | Sequence[Message],
        n: int = 1,
        *,
        tools: list[dict[str, Any]] | None = None,
        max_tokens: int = 128,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        step: int | None = None,
    ) -> SampleOutput:
        """Sample `n` completions of `prompt` (token ids, or chat messages rendered with the chat template
        and `tools`) from the latest saved weights, or from `step`."""
        req = SampleRequest.model_validate(
            {
                "prompt": list(prompt),
                "tools": tools,
                "n": n,
                "max_tokens": max_tokens,
                "temperature": temperature,
                "top_p": top_p,
                "seed": seed,
                "step": step,
            }
        )
        return await self.backend.sample(self.spec, req)
