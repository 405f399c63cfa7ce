"""Data-parallel LoRA training over torch.distributed: M workers, one optimizer step, one adapter.

Each worker (a process, or a Ray actor: `training/ray_workers.py`) holds the whole base model and the
adapter, and joins one process group (gloo on the CPU, NCCL on CUDA). For one optimizer step every worker
gets the same datums and cuts them into the same weighted micro-batches (`primitives.plan_step`); worker r
runs only its share of them (`shares`: contiguous runs of micro-batches with about equal token counts, so
neighbouring prompts stay together). The weights are the whole batch's, not the share's, so summing the
workers' gradients (one all-reduce of the flattened LoRA gradients) gives exactly the gradient the
single-process trainer accumulates: the loss scale is the same. Every worker then clips and steps its own
AdamW on that same gradient, from the same state, so the adapters stay identical without a broadcast.

What differs from one process: the batch-wide shared prefix (`trainer.SharedPrefix`) is computed once per
step *per worker*, over that worker's share; sums are taken in another order, so the adapter matches the
single-process one to float tolerance, not bit for bit (tested: `tests/test_distributed.py`). A worker with
no micro-batch (more workers than micro-batches) contributes a zero gradient.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from advantage.config import LoRAConfig, LossConfig, TrainConfig
from advantage.training.grpo import drift_metrics
from advantage.training.primitives import (
    MeanOver,
    Partial,
    Progress,
    StepPlan,
    plan_step,
    run_share,
    summarize,
)
from advantage.training.schedules import step_lr
from advantage.training.trainer import Trainer
from advantage.wire.datum import Datum


@dataclass(frozen=True)
class GroupSpec:
    """How one worker joins the data-parallel group."""

    rank: int
    world_size: int
    init_method: str
    """Where the workers meet: "tcp://HOST:PORT" (rank 0's host), or "file:///a/shared/path"."""
    backend: str | None = None
    """The backend, "gloo" or "nccl"; None picks NCCL on CUDA and gloo on the CPU."""
    timeout_s: float = 600.0
    """How long a collective waits for the other workers before it fails (a dead worker shows up here)."""

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside a group of {self.world_size} workers.")


def default_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def join_group(spec: GroupSpec, device: torch.device) -> None:
    """Join the process-wide default group (one data-parallel group per process)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's object collectives use the current device
    dist.init_process_group(
        backend=spec.backend or default_backend(device),
        init_method=spec.init_method,
        rank=spec.rank,
        world_size=spec.world_size,
        timeout=datetime.timedelta(seconds=spec.timeout_s),
    )


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shares(plan: StepPlan, datums: Sequence[Datum], world_size: int) -> list[list[int]]:
    """Micro-batch indices per worker: contiguous runs with about equal tokens (each micro-batch goes to the
    worker whose slice of the cumulative token count holds its midpoint). The same on every worker."""
    cost = [sum(len(datums[i].input_ids) for i in chunk) for chunk in plan.chunks]
    total = max(sum(cost), 1)
    out: list[list[int]] = [[] for _ in range(world_size)]
    before = 0
    for k, c in enumerate(cost):
        out[min(world_size - 1, int(world_size * (before + c / 2) / total))].append(k)
        before += c
    return out


def all_reduce_grads(params: Sequence[torch.Tensor]) -> None:
    """Sum every parameter's gradient over the group, in one flat fp32 buffer. A parameter no worker gave a
    gradient keeps None (AdamW skips it, as in one process); one that only some gave, gets zeros elsewhere."""
    device = params[0].device
    has_P = torch.tensor([float(p.grad is not None) for p in params], device=device)
    dist.all_reduce(has_P)
    live = [p for p, h in zip(params, has_P.tolist(), strict=True) if h > 0]
    if not live:
        return
    flat = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in live]
    )
    dist.all_reduce(flat)  # SUM
    offset = 0
    for p in live:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
        offset += n


def broadcast_params(params: Sequence[torch.Tensor], src: int = 0) -> None:
    """Make every worker's adapter equal to worker `src`'s (at start, and after a load)."""
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src)


def forward_backward(
    trainer: Trainer,
    datums: list[Datum],
    loss: str,
    cfg: LossConfig | None = None,
    micro_batch_size: int = 8,
    progress: Progress | None = None,
    mean_over: MeanOver | None = None,
) -> tuple[dict[str, float], list[list[float]]]:
    """`primitives.forward_backward` over the group: this worker runs its share of the batch, then the
    gradients are summed and the metrics and logprobs gathered. Every worker returns the same values."""
    plan = plan_step(datums, loss, cfg, micro_batch_size, mean_over)
    mine = shares(plan, datums, dist.get_world_size())[dist.get_rank()]
    part = run_share(trainer, datums, plan, mine, progress)
    all_reduce_grads(trainer.params)
    parts: list[Partial | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    return summarize(datums, plan, [p for p in parts if p is not None])


class TrainerWorker:
    """One rank of a data-parallel trainer: a full `Trainer` (base + adapter) in its own process. Every
    method is collective: call it on all workers of the group with the same arguments."""

    def __init__(
        self,
        model_path: str | Path,
        lora: LoRAConfig,
        spec: GroupSpec,
        *,
        dtype: str = "auto",
        device: str | None = None,
        seed: int = 0,
        threads: int | None = None,
    ) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self.spec = spec
        self.trainer = Trainer(model_path, lora, dtype=dtype, device=device, seed=seed)
        join_group(spec, self.trainer.device)
        broadcast_params(self.trainer.params)  # same start even if a seed or a library differs

    @property
    def rank(self) -> int:
        return self.spec.rank

    def train_datums(
        self,
        datums: list[Datum],
        config: TrainConfig,
        step: int,
        progress: Progress | None = None,
        mean_over: MeanOver | None = None,
    ) -> dict[str, float]:
        """One optimizer step on `datums` from `step` completed steps: the part of `grpo.train_step` after
        tokenization, over the group. Returns the same metrics on every worker."""
        with self.trainer.gradient_checkpointing(config.gradient_checkpointing):
            fb_metrics, new_lp = forward_backward(
                self.trainer, datums, config.loss, config, config.micro_batch_size, progress, mean_over
            )
        lr = step_lr(config, step, len(datums), mean_over.sequences if mean_over else len(datums))
        grad_norm = self.trainer.optim_step(config, lr=lr)  # a TrainConfig is an AdamParams
        new_all = [x for d, lp in zip(datums, new_lp, strict=True) for x in _masked(lp, d.loss_mask)]
        old_all = [x for d in datums if d.logprobs for x in _masked(d.logprobs, d.loss_mask)]
        return {
            **fb_metrics,
            **drift_metrics(new_all, old_all),
            "grad_norm": grad_norm,
            "lr": lr,
            "trainer_workers": float(self.spec.world_size),
        }

    def save(self, out: str | Path) -> None:
        """Write the checkpoint (adapter + optimizer). Every worker holds the same state: call it on one."""
        Path(out).mkdir(parents=True, exist_ok=True)
        self.trainer.save(Path(out))

    def load(self, src: str | Path) -> None:
        """Read a checkpoint: call it on every worker, with a directory each of them sees."""
        self.trainer.load(Path(src))

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapter's weights on the CPU, by parameter name."""
        return {
            n: p.detach().cpu().clone() for n, p in self.trainer.model.named_parameters() if p.requires_grad
        }

    def close(self) -> None:
        leave_group()


def free_port_init_method(host: str = "127.0.0.1") -> str:
    """A "tcp://host:port" rendezvous on a port that is free now (rank 0 binds it when it starts)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return f"tcp://{host}:{s.getsockname()[1]}"


def worker_threads(world_size: int) -> int:
    """CPU threads per worker so that M workers on one box share its cores instead of fighting for them."""
    return max(1, (os.cpu_count() or 1) // world_size)


def _masked(values: list[float], mask: list[float]) -> list[float]:
    return [x for x, m in zip(values, mask, strict=True) if m]
