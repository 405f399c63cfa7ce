"""`advantage serve`'s settings: one pydantic model, whose fields are the command's options (`serve(config)`
in `runner.py` runs it; the CLI only parses it)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="Interface to bind; keep 127.0.0.1 unless behind a proxy.")
    port: int = Field(7999, ge=0, le=65535, description="Port to listen on.")
    api_key: str | None = Field(
        None,
        repr=False,
        description="Require 'Authorization: Bearer KEY' (from ADVANTAGE_API_KEY when not given).",
        json_schema_extra={"envvar": "ADVANTAGE_API_KEY"},
    )
    base_model: list[str] = Field(
        ["smollm2-135m-instruct"],
        description="Base model(s) to load at start: a bundled name or an HF model dir; repeat for several.",
    )
    root: Path = Field(Path(".advantage"), description="Checkpoint root.")
    model_dir: list[Path] = Field(
        [],
        description="A directory of model directories that clients may register as base_model (by path, or "
        "by path relative to it); repeat for several. Besides these, only bundled names and the base_model "
        "models load.",
    )
    max_pending: int = Field(
        256, ge=1, description="Requests that may wait for the engine's batch; more are answered 429."
    )
    max_train_queue: int = Field(
        16,
        ge=0,
        description="Train steps and low-level ops that may wait for the training thread besides the one "
        "running; more are answered 429.",
    )
    record: bool = Field(
        False,
        description="Record the chat completions of every trainable model (each in traffic.sqlite in its run "
        "dir), for POST /v1/feedback and online training. Without it, only models registered with "
        "record_traffic=True record.",
    )
    background_samples: int = Field(
        0,
        ge=0,
        le=16,
        description="Background samples per recorded request: this many more choices of every chat "
        "completion a recording model serves, sampled in the same batch and recorded beside the caller's, "
        "never returned, so an online judge can score each request as a group. For models whose register "
        "asks for none; 0: off.",
    )
    trainer_workers: int = Field(
        1,
        ge=1,
        description="Data-parallel trainer workers per trainable model, placed as Ray actors (needs the "
        "optional ray extra); 1 trains in this process.",
    )
    engine_replicas: int = Field(
        1,
        ge=1,
        description="Engine replicas per base model, placed as Ray actors (needs the optional ray extra); "
        "requests are routed by prompt prefix, else to the least loaded. 1 serves from this process.",
    )
    ray_address: str | None = Field(
        None,
        description="A Ray cluster to place trainer workers and engine replicas on; default: a local one.",
    )
    cpus_per_trainer: float = Field(1.0, gt=0, description="CPUs each trainer worker reserves.")
    gpus_per_trainer: float = Field(
        0.0, ge=0, description="GPUs each trainer worker reserves (> 0: CUDA and NCCL)."
    )
    cpus_per_engine: float = Field(1.0, gt=0, description="CPUs each engine replica reserves.")
    gpus_per_engine: float = Field(0.0, ge=0, description="GPUs each engine replica reserves (> 0: CUDA).")
    engine: Literal["torch", "vllm"] = Field(
        "torch",
        description="The inference engine: torch (CPU or CUDA), or vllm (NVIDIA GPUs; untested so far, and it "
        "needs requirements-gpu.txt in its own virtualenv: README, 'Scaling out').",
    )
    engine_threads: int | None = Field(
        None,
        ge=1,
        description="torch threads of the torch engine (default: torch's). 1 leaves the other cores to the "
        "trainer, for clients that train one step while the next one's rollouts gather (README, 'Training "
        "while the next rollouts gather').",
    )

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        if self.engine_threads is not None and self.engine != "torch":
            raise ValueError("engine_threads: only the torch engine takes a thread count")
        if not self.base_model:
            raise ValueError("base_model: give at least one base model to load")
        return self

    @property
    def uses_ray(self) -> bool:
        """Whether trainer workers or engine replicas are placed on Ray."""
        return self.trainer_workers > 1 or self.engine_replicas > 1 or self.ray_address is not None


__all__ = ["ServeConfig"]
