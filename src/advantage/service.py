"""The backend's core: engines, registered models, and which weights a served model name resolves to.

Both the HTTP server and `LocalBackend` wrap one `Service`. Served names are:
- a base model's name (`smollm2-135m-instruct`, or the path it was given as);
- a trainable model's `name` (its default step: the latest, unless the online trainer's promotion gate has
  set one, see `promote`) and `name@step` (any step still on disk).
Step 0 of a trainable model is the empty adapter, i.e. the base weights (or, for a fork, a copy of another
model's checkpoint).

Every use of a trainer runs on one training thread (`training/thread.py`); at most `max_train_queue` jobs
wait for it, and past that `submit_train` raises `QueueFull` (the server answers 429 with Retry-After).
With `model_dirs` set (as `advantage serve` does), `register` loads only bundled models, models already
loaded, and model directories under those dirs; without it (the embedded LocalBackend), any local model
directory.

A trainable model registered with `record_traffic=True` (or every one, with `Service(record_traffic=True)`,
i.e. `advantage serve --record`) has the chat completions it serves recorded in its run dir
(`online/store.py`), for feedback (`online/feedback.py`) and online training.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import re
import shutil
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from advantage.config import LoRAConfig, TrainConfig
from advantage.engine.base import Engine, EngineFactory
from advantage.engine.models import allowed_base_model, resolve_model_path
from advantage.files import write_text_atomic
from advantage.online.store import FILENAME as TRAFFIC_FILE
from advantage.online.store import Retention, SQLiteTrafficStore, TrafficStore
from advantage.registry import ModelEntry, UnknownServedModel, Weights, check_name
from advantage.tracking import RunLog, group_metrics, policy_lag
from advantage.training import checkpoints as ckpt
from advantage.training import fork
from advantage.training.grpo import Progress, train_step
from advantage.training.ray_workers import RayTrainerGroup
from advantage.training.thread import TrainingThread, memory_short, release_freed_memory
from advantage.training.trainer import Trainer
from advantage.trajectory import TrajectoryGroup, check_groups

T = TypeVar("T")
DEFAULT_FILE = "default_step.json"  # in the run dir: the step `name` serves, once a promotion gate set one


class Service:
    def __init__(
        self,
        root: str | Path,
        engine_kwargs: dict[str, Any] | None = None,
        *,
        model_dirs: Sequence[str | Path] | None = None,
        max_train_queue: int = 16,
        record_traffic: bool = False,
        traffic_retention: Retention | None = None,
        background_samples: int = 0,
        engine_factory: EngineFactory | None = None,
        trainer_factory: Callable[[Path, LoRAConfig], Trainer] | None = None,
        share_base_weights: bool = True,
    ) -> None:
        """`engine_kwargs` go to every `TorchEngine` (e.g. `max_pending`); `engine_factory` replaces it (a base
        model's directory -> any engine of the `engine/base.py` contract). `model_dirs`: where `register` may
        load base models from besides the bundled ones (None: anywhere). `max_train_queue`: jobs that may wait
        for the training thread besides the one running. `record_traffic`: record every trainable model's
        traffic, whatever its register asked; `traffic_retention`: how much each model's store keeps;
        `background_samples`: background samples for every recording model that asks for none itself.
        `trainer_factory` replaces the in-process `Trainer` (a base model's directory and LoRA config -> its
        trainer), e.g. data-parallel workers on Ray (`training/ray_workers.py`). `share_base_weights`: the
        in-process trainer builds on the base weights of its model's `TorchEngine` (`engine/weights.py`; one
        copy, not two); off, it loads its own copy, which trains bit for bit the same."""
        self.root = Path(root)
        self.engine_kwargs = engine_kwargs or {}
        self.engine_factory = engine_factory
        self.trainer_factory = trainer_factory or self._local_trainer
        self.share_base_weights = share_base_weights
        self.model_dirs = None if model_dirs is None else [Path(d) for d in model_dirs]
        self.record_traffic = record_traffic
        self.traffic_retention = traffic_retention or Retention()
        if not 0 <= background_samples <= 16:
            raise ValueError(f"background_samples must be in [0, 16], got {background_samples}.")
        self.background_samples = background_samples
        # Every use of a trainer runs there; while a job runs, `busy` is set and the in-process engines
        # decode on fewer threads (`TorchEngine(threads_while_training=)`), leaving the cores to the update.
        self.training = TrainingThread(max_train_queue)
        self.trainer_busy = self.training.busy
        self._engines: dict[str, Engine] = {}
        self._models: dict[str, ModelEntry] = {}
        self._lock = threading.RLock()
        self._register_gates: dict[str, threading.Lock] = {}  # name -> lock: one register of a name at a time

    # ------------------------------------------------------------------ engines and names
    def engine(self, base_model: str) -> Engine:
        with self._lock:
            if base_model not in self._engines:
                self._engines[base_model] = self._new_engine(resolve_model_path(base_model))
            return self._engines[base_model]

    def _new_engine(self, model_dir: Path) -> Engine:
        if self.engine_factory is not None:
            return self.engine_factory(model_dir)
        from advantage.engine.torch_engine import TorchEngine

        return TorchEngine(model_dir, **{"trainer_busy": self.trainer_busy, **self.engine_kwargs})

    def _local_trainer(self, model_dir: Path, lora: LoRAConfig) -> Trainer:
        """An in-process trainer, on the base weights of the engine that serves `model_dir` where there is one
        (one copy of them, not two, when both run on one device in one dtype)."""
        from advantage.engine.torch_engine import TorchEngine

        # The engine's dtype and device, so sampler and trainer compute alike: an engine asked for fp32 on a
        # GPU must not be paired with a trainer that picked bf16 there for itself.
        same = {k: self.engine_kwargs[k] for k in ("dtype", "device") if k in self.engine_kwargs}
        if not self.share_base_weights:
            return Trainer(model_dir, lora, **same)
        with self._lock:
            engines = list(self._engines.values())
        source = Path(model_dir).resolve()
        shared = next(
            (
                e.base_weights
                for e in engines
                if isinstance(e, TorchEngine) and e.base_weights.source == source
            ),
            None,
        )
        return Trainer(model_dir, lora, base_weights=shared, **same)

    def add_model(self, entry: ModelEntry) -> None:
        with self._lock:
            old = self._models.get(entry.name)
            if old is not None and (old.project, old.base_model) != (entry.project, entry.base_model):
                raise ValueError(
                    f"A model named {entry.name!r} is already registered (project {old.project!r}, base "
                    f"{old.base_model!r}); pick another name."
                )
            self.engine(entry.base_model)
            self._models[entry.name] = entry

    def model_entry(self, name: str) -> ModelEntry:
        try:
            return self._models[name]
        except KeyError:
            raise UnknownServedModel(f"Model {name!r} is not registered on this backend.") from None

    def publish_step(self, name: str, step: int, adapter_dir: Path) -> None:
        """Make `name@step` servable at once (hot swap: no restart, running batches are not torn)."""
        entry = self.model_entry(name)
        self.engine(entry.base_model).load_adapter(f"{name}@{step}", adapter_dir)
        entry.steps[step] = adapter_dir
        # Keep the engine's memory bounded: older steps stay on disk and load again on demand.
        for old in [s for s in entry.steps if s < step - 1 and s != entry.default]:
            with contextlib.suppress(RuntimeError):  # still serving a batch: it goes on the next publish
                self.engine(entry.base_model).remove_adapter(f"{name}@{old}")

    # ------------------------------------------------------------------ training
    def register(
        self,
        project: str,
        name: str,
        base_model: str,
        lora: LoRAConfig | None = None,
        fork_from: str | None = None,
        record_traffic: bool = False,
        background_samples: int = 0,
    ) -> int:
        """Register a trainable model; resume from its newest complete checkpoint. Returns the step.

        `fork_from` (`other@step`, `other` for its latest step, or `project/other@step`): a model with no
        checkpoints yet starts with a copy of that checkpoint as its step 0 (`training/fork.py`).
        `record_traffic`: record the chat completions it serves (each register sets it anew; the service's
        own `record_traffic` turns it on for every model). `background_samples`: with recording on, sample
        and record that many more choices per request, never returned (the service's own setting when 0).
        Registers of one name run one at a time. One that fails (say, a LoRA config the base model cannot
        take) leaves no trace: the name stays free and unlisted, and an engine it started is closed."""
        check_name("project", project)
        check_name("model name", name)
        if self.model_dirs is not None:
            with self._lock:
                loaded = list(self._engines)
            base_model = allowed_base_model(base_model, self.model_dirs, loaded)
        lora = lora or LoRAConfig()
        ref = None
        if fork_from is not None:
            ref = ckpt.parse_ref(fork_from, project)
            check_name("project", ref[0])
            check_name("model name", ref[1])
            if ref[:2] == (project, name):
                raise ValueError(f"Model {name!r} cannot be forked from itself; fork into a new name.")
        mdir = ckpt.model_dir(self.root, project, name)
        with self._lock:
            # One gate per name, made on first use: a second register of a name waits for the first to
            # finish, then finds its result (or, if it failed, tries afresh).
            gate = self._register_gates.setdefault(name, threading.Lock())
        with gate:
            existing = self._models.get(name)
            if existing is not None:
                if (existing.project, existing.base_model) != (project, base_model):
                    raise ValueError(
                        f"A model named {name!r} is already registered (project {existing.project!r}, base "
                        f"{existing.base_model!r}); pick another name."
                    )
                if existing.trainer is not None:
                    if ref is not None:
                        fork.check_resumable(mdir, name, ref)
                    self._set_recording(existing, record_traffic, background_samples)
                    return existing.latest
            source = None
            if ref is not None:  # checked before the (slow) trainer loads: a bad source fails fast
                ckpt.sweep_partial(mdir)
                if ckpt.list_steps(mdir):
                    fork.check_resumable(mdir, name, ref)
                else:
                    source = fork.find_source(self.root, *ref, base_model, lora)
            with self._lock:
                new_engine = base_model not in self._engines
            trainer: Trainer | None = None
            try:
                # The engine first: the in-process trainer builds on its base weights. A bad base model or
                # LoRA config fails here, before anything is kept or served.
                self.engine(base_model)
                trainer = self.trainer_factory(resolve_model_path(base_model), lora)
                ckpt.sweep_partial(mdir)
                steps = ckpt.list_steps(mdir)
                origin = {"base_model": base_model, "lora": lora.model_dump()}
                if not steps and source is not None:  # step 0: a copy of the source's checkpoint
                    fork.write_fork(mdir, source, origin)
                    RunLog(mdir).append(0, fork.SPLIT, {"forked_from": source.ref()})
                    steps = [0]
                default = _read_default(mdir, steps)
                if not steps:  # step 0: the freshly initialised (empty) adapter, i.e. the base weights
                    ckpt.write_step(mdir, 0, trainer.save, origin)
                    steps = [0]
                else:  # training goes on from the promoted step when a gate set one (`promote`), else the latest
                    trainer.load(ckpt.step_dir(mdir, steps[-1] if default is None else default))
                # Step 0 is served as the base weights, unless it holds a forked adapter.
                forked = fork.forked_from(mdir) is not None
                published = {s: ckpt.step_dir(mdir, s) for s in steps if s > 0 or forked}
                entry = ModelEntry(project, name, base_model, published, trainer=trainer, run_dir=mdir)
                entry.default = default
                self._set_recording(entry, record_traffic, background_samples)
                self.add_model(entry)
            except BaseException:
                if isinstance(trainer, RayTrainerGroup):
                    trainer.close()
                with self._lock:
                    unused = new_engine and all(m.base_model != base_model for m in self._models.values())
                    engine = self._engines.pop(base_model, None) if unused else None
                if engine is not None:
                    engine.close()
                raise
            return entry.latest

    # ------------------------------------------------------------------ traffic
    def _set_recording(self, entry: ModelEntry, record: bool, background: int = 0) -> None:
        assert entry.run_dir is not None
        with self._lock:
            entry.record = record or self.record_traffic
            entry.background = (background or self.background_samples) if entry.record else 0
            if entry.record and entry.traffic is None:
                entry.traffic = SQLiteTrafficStore(entry.run_dir / TRAFFIC_FILE, self.traffic_retention)

    def recorder(self, name: str) -> TrafficStore | None:
        """The store a completion served by model `name` is recorded in; None when it does not record."""
        with self._lock:
            entry = self._models.get(name)
            return entry.traffic if entry is not None and entry.record else None

    def background_samples_of(self, name: str) -> int:
        """How many background samples a request served by model `name` gets (0 unless it records)."""
        with self._lock:
            entry = self._models.get(name)
            return entry.background if entry is not None and entry.record else 0

    def traffic_stores(self, name: str | None = None) -> list[TrafficStore]:
        """The stores feedback looks in: model `name`'s (every trainable model's with None). A model that
        records no more keeps the store it wrote, opened on demand, so its traffic can still be rated."""
        stores = []
        with self._lock:
            for e in [self.model_entry(name)] if name is not None else list(self._models.values()):
                path = e.run_dir / TRAFFIC_FILE if e.run_dir is not None else None
                if e.traffic is None and path is not None and path.exists():
                    e.traffic = SQLiteTrafficStore(path, self.traffic_retention)
                if e.traffic is not None:
                    stores.append(e.traffic)
        return stores

    def train_async(
        self, name: str, groups: list[TrajectoryGroup], config: TrainConfig, progress: Progress | None = None
    ) -> asyncio.Future[tuple[int, dict[str, float]]]:
        """`train` on the service's training thread, awaitable (inference keeps being served meanwhile).
        Queued at once: a full queue raises `QueueFull` here, before anything is awaited."""
        return asyncio.wrap_future(self.submit_train(self.train, name, groups, config, progress))

    def train(
        self, name: str, groups: list[TrajectoryGroup], config: TrainConfig, progress: Progress | None = None
    ) -> tuple[int, dict[str, float]]:
        """One training step; the new adapter is checkpointed and served before this returns."""
        entry, trainer = self.trainable(name)
        with entry.lock:
            lag = policy_lag(groups, name, entry.latest)
            if isinstance(trainer, RayTrainerGroup):  # data-parallel workers run the step
                metrics = trainer.train_step(groups, config, progress, step=entry.latest)
            else:
                metrics = train_step(trainer, groups, config, progress, step=entry.latest)
            metrics.update(group_metrics(groups, "train"), **lag)
            step = entry.latest
            if not metrics.get("skipped_step"):
                step = self.save_step(name, {"metrics": metrics, "config": config.model_dump()})
            entry.log.append(step, "train", metrics)
            entry.log.write_trajectories("train", step, groups)
        if memory_short():
            release_freed_memory()
        return step, metrics

    def save_step(self, name: str, state: dict[str, Any]) -> int:
        """Checkpoint the trainer's adapter as the next step (atomically) and serve it. Returns the step."""
        entry, trainer = self.trainable(name)
        assert entry.run_dir is not None
        step = entry.latest + 1
        adir = ckpt.write_step(entry.run_dir, step, trainer.save, state)
        self.publish_step(name, step, adir)
        return step

    def restore(self, name: str, step: int | None = None, metric: str = "val/reward") -> tuple[int, int]:
        """Go back to an earlier step: its adapter and optimizer state are loaded into the trainer and saved as
        a new latest step, served at once (`name` then answers with those weights; history is kept).

        `step=None` picks the best step on disk by `metric` (the highest; the later on ties). Returns
        (new step, restored step). A row with split "restore" in metrics.jsonl records the choice."""
        entry, trainer = self.trainable(name)
        assert entry.run_dir is not None
        with entry.lock:
            on_disk = ckpt.list_steps(entry.run_dir)
            logged = entry.log.metric_by_step(metric)
            if step is None:
                scores = {s: v for s, v in logged.items() if s in on_disk}
                if not scores:
                    raise ValueError(
                        f"No step on disk has a logged {metric!r}; evaluate with model.log(groups, split=...) "
                        "first, or pass the step to restore."
                    )
                step = ckpt.best_step(scores)
            if step not in on_disk:
                raise ValueError(f"Step {step} of {name!r} is not on disk; steps on disk: {on_disk}.")
            value = logged.get(step)
            trainer.load(ckpt.step_dir(entry.run_dir, step))
            new = self.save_step(name, {"source": "restore", "restored_from": step})
            if entry.default is not None:  # a restore is served at once, gate or not
                self._set_default(entry, new)
            row: dict[str, Any] = {"restored_from": float(step)}
            if value is not None:
                row.update(metric=metric, value=value)
            entry.log.append(new, "restore", row)
        return new, step

    # ------------------------------------------------------------------ promotion (the online trainer's gate)
    def online_start(self, name: str) -> tuple[int, int]:
        """Begin (or resume) gated training: the default step is fixed (the latest, if no gate set one yet)
        and the trainer reloads its weights and optimizer state, dropping whatever a step that died midway
        or a step never gated left in memory. Returns (default step, latest step)."""
        entry, trainer = self.trainable(name)
        assert entry.run_dir is not None
        with entry.lock:
            if entry.default is None:
                self._set_default(entry, entry.latest)
            assert entry.default is not None
            trainer.load(ckpt.step_dir(entry.run_dir, entry.default))
            return entry.default, entry.latest

    def promote(self, name: str, step: int, accept: bool, metrics: dict[str, float]) -> int:
        """The promotion gate's verdict on `step`: accepted, it becomes the default (`name` serves it, and
        training goes on from it); refused, it stays addressable as `name@step` and the trainer goes back to
        the default's weights and optimizer state. A row with split "online" (`promoted` 1 or 0, and
        `metrics`) goes to metrics.jsonl at `step`. Returns the default step."""
        entry, trainer = self.trainable(name)
        assert entry.run_dir is not None
        with entry.lock:
            if step not in entry.steps:
                raise ValueError(
                    f"Step {step} of {name!r} is not served; served steps: {sorted(entry.steps)}."
                )
            if accept:
                if step != entry.latest:  # the trainer holds the latest step: train on from the promoted one
                    trainer.load(ckpt.step_dir(entry.run_dir, step))
                self._set_default(entry, step)
            elif entry.default is None:
                raise ValueError(f"No default step to go back to for {name!r}: call online_start first.")
            else:
                trainer.load(ckpt.step_dir(entry.run_dir, entry.default))
            entry.log.append(step, "online", {"promoted": float(accept), **metrics})
            assert entry.default is not None
            return entry.default

    def _set_default(self, entry: ModelEntry, step: int) -> None:
        assert entry.run_dir is not None
        write_text_atomic(entry.run_dir / DEFAULT_FILE, json.dumps({"default": step}))
        entry.default = step

    def trainable(self, name: str) -> tuple[ModelEntry, Trainer]:
        entry = self.model_entry(name)
        if entry.trainer is None or entry.run_dir is None:
            raise UnknownServedModel(f"Model {name!r} is not trainable on this backend; register it first.")
        return entry, entry.trainer

    async def on_train_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the training thread (where every use of the trainer happens), awaitable.
        Cancelling the await drops the job if it has not started yet."""
        return await self.training.run(fn, *args)

    def submit_train(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """Queue `fn(*args)` for the training thread, or raise `QueueFull` if `max_train_queue` jobs wait."""
        return self.training.submit(fn, *args)

    def log_groups(
        self, name: str, groups: list[TrajectoryGroup], split: str, step: int | None = None
    ) -> dict[str, float]:
        """Record evaluation groups under `split` at `step`: an earlier one (0, or a step on disk), for an
        evaluation of `name@step` that finished after a later step was trained; or, with None, the latest
        step, read under the model's lock, so it cannot move under it (a train step publishing the next)."""
        check_name("split", split)  # it becomes a directory name
        entry = self.model_entry(name)
        check_groups(groups, "log")  # any model's trajectories: no vocabulary to check their ids against
        metrics = group_metrics(groups, split)
        with entry.lock:
            at = entry.latest if step is None else step
            if step is not None and step != 0 and step not in entry.steps:
                raise ValueError(
                    f"Cannot log at step {step} of {name!r}: no such step. Steps: {sorted({0, *entry.steps})}; "
                    "log at the step whose weights (`name@step`) were evaluated, or leave step out for the latest."
                )
            entry.log.append(at, split, metrics)
            entry.log.write_trajectories(split, at, groups)
        return metrics

    def delete_checkpoints(
        self, name: str, keep: str = "best+latest", metric: str = "val/reward"
    ) -> list[int]:
        entry = self.model_entry(name)
        assert entry.run_dir is not None
        with entry.lock:  # not while a train step writes and publishes the next step
            scores: dict[int, float | None] = {s: None for s in entry.steps}
            scores.update({s: v for s, v in entry.log.metric_by_step(metric).items() if s in entry.steps})
            doomed = [s for s in ckpt.steps_to_delete(scores, entry.latest, keep) if s != entry.default]
            for s in doomed:
                with self._lock:  # not while `resolve` loads this step's adapter from disk
                    self.unpublish_step(name, s)
                    shutil.rmtree(ckpt.step_dir(entry.run_dir, s), ignore_errors=True)
        return doomed

    def unpublish_step(self, name: str, step: int) -> None:
        entry = self.model_entry(name)
        if entry.steps.pop(step, None) is not None:
            self.engine(entry.base_model).remove_adapter(f"{name}@{step}")

    def resolve(self, served: str) -> Weights:
        """Map a request's `model` field to the weights that answer it."""
        with self._lock:
            if served in self._engines:
                return Weights(self._engines[served], None, served, 0)
            name, _, step_s = served.partition("@")
            entry = self._models.get(name)
            if entry is None:
                if not self._models and not self._engines:
                    raise UnknownServedModel("No model is loaded on this backend yet.")
                raise UnknownServedModel(
                    f"The model {served!r} does not exist. Available: {', '.join(self.served_names())}."
                )
            if step_s:
                # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
                if not re.fullmatch(r"[0-9]{1,18}", step_s):
                    raise UnknownServedModel(f"Bad step in {served!r}: use name@<integer step>.")
                step = int(step_s)
            else:
                step = entry.served
            if step != 0 and step not in entry.steps:
                raise UnknownServedModel(
                    f"Step {step} of {name!r} is not available; served steps: {sorted([0, *entry.steps])}."
                )
            adapter = f"{name}@{step}" if step in entry.steps else None  # step 0: base weights, or a fork
            engine = self._engines[entry.base_model]
            if adapter and adapter not in engine.adapters():  # an older step on disk: load it on first use
                engine.load_adapter(adapter, entry.steps[step])
            return Weights(self._engines[entry.base_model], adapter, name, step)

    def served_names(self) -> list[str]:
        with self._lock:
            names = list(self._engines)
            for entry in self._models.values():
                names.append(entry.name)
                names += [f"{entry.name}@{s}" for s in sorted({0, *entry.steps})]
            return names

    def close(self) -> None:
        self.training.close()
        for engine in self._engines.values():
            engine.close()
        for entry in self._models.values():
            if entry.traffic is not None:
                entry.traffic.close()
            if isinstance(entry.trainer, RayTrainerGroup):
                entry.trainer.close()
        # Drop the engines and trainers (their weights) now: the server's endpoints close over this service,
        # and FastAPI keeps endpoint functions in a process-wide cache, so the service itself outlives close.
        with self._lock:
            self._engines.clear()
            self._models.clear()
        release_freed_memory()


def _read_default(mdir: Path, steps: list[int]) -> int | None:
    """The default step a promotion gate recorded, if it is still on disk."""
    path = mdir / DEFAULT_FILE
    if not path.exists():
        return None
    step = int(json.loads(path.read_text())["default"])
    return step if step in steps else None
