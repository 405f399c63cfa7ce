"""M data-parallel trainer workers placed as Ray actors, behind the one-trainer interface the service uses.

`RayTrainerGroup.start(model_dir, lora, placement)` joins a Ray cluster (`placement.ray_address`), or starts
a local one, reserves one placement-group bundle per worker (CPUs and GPUs per worker configurable; PACK:
on as few nodes as fit), starts a `TrainerActor` in each, and has them form one torch.distributed group
(gloo on the CPU, NCCL when the actors have GPUs; rank 0's node address and a free port as the rendezvous).
Each actor holds a full `distributed.TrainerWorker`: the base model and the adapter.

To the service the group is a `Trainer`: `train_step` tokenizes here (the tokenizer is all this process
loads), sends the datums to every worker once (Ray's object store) and runs one data-parallel step;
`save` writes worker 0's checkpoint files here; `load` sends a checkpoint's files to every worker. So the
workers need no shared directory with this process, only the base model at the same path. The low-level
API (forward, forward_backward, optim_step) and SFT are not distributed: on a group they raise.

A failed call (a worker died, or raised) raises at once with what failed; nothing is saved or published.
Every worker is then stopped (the survivors' process group is broken), and the next call starts fresh
ones on the last checkpoint saved or loaded: the last step the service published.

Ray is imported only here, and only when a group starts: with one trainer worker nothing imports it.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoTokenizer

from advantage import cluster
from advantage.config import LoRAConfig, TrainConfig
from advantage.training.distributed import GroupSpec, TrainerWorker, free_port_init_method
from advantage.training.grpo import step_datums
from advantage.training.primitives import MeanOver, Progress
from advantage.training.trainer import Trainer
from advantage.trajectory import TrajectoryGroup
from advantage.wire.datum import Datum

READY_TIMEOUT_S = 120.0  # how long the cluster may take to find room for every worker


@dataclass(frozen=True)
class Placement:
    """Where the trainer workers run."""

    workers: int = 1
    """Data-parallel trainer workers (Ray actors); 1 keeps the in-process trainer and never imports Ray."""
    ray_address: str | None = None
    """A Ray cluster to join ("auto", "ray://host:10001", "host:6379"); None starts a local one."""
    cpus_per_worker: float = 1.0
    """CPUs each worker reserves in its placement-group bundle (also its torch thread count, at least 1)."""
    gpus_per_worker: float = 0.0
    """GPUs each worker reserves; > 0 puts the worker's trainer on CUDA and the group on NCCL."""
    dtype: str = "auto"
    """The workers' trainer dtype, as `Trainer`'s."""

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"trainer workers must be >= 1, got {self.workers}.")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise ValueError("cpus_per_worker must be > 0 and gpus_per_worker >= 0.")

    @property
    def uses_ray(self) -> bool:
        return self.workers > 1 or self.ray_address is not None


class TrainerActor:
    """The body of one Ray actor: a `TrainerWorker` once `setup` has run (all workers at once)."""

    def __init__(self) -> None:
        self.worker: TrainerWorker | None = None

    def rendezvous(self) -> str:
        """The group's rendezvous, "tcp://node-ip:free-port", asked of worker 0."""
        import ray

        return free_port_init_method(ray.util.get_node_ip_address())

    def setup(
        self, model_dir: str, lora: LoRAConfig, spec: GroupSpec, dtype: str, gpu: bool, threads: int
    ) -> int:
        device = "cuda" if gpu else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPUs
        self.worker = TrainerWorker(model_dir, lora, spec, dtype=dtype, device=device, threads=threads)
        return os.getpid()

    def train_datums(
        self, datums: list[Datum], config: TrainConfig, step: int, mean_over: MeanOver | None = None
    ) -> dict[str, float]:
        assert self.worker is not None
        return self.worker.train_datums(datums, config, step, mean_over=mean_over)

    def save_files(self) -> dict[str, bytes]:
        assert self.worker is not None
        with tempfile.TemporaryDirectory() as tmp:
            self.worker.save(tmp)
            return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}

    def load_files(self, files: dict[str, bytes]) -> None:
        assert self.worker is not None
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in files.items():
                (Path(tmp) / name).write_bytes(data)
            self.worker.load(tmp)

    def adapter_state(self) -> dict[str, Any]:
        assert self.worker is not None
        return self.worker.adapter_state()

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()


class RayTrainerGroup(Trainer):
    """M trainer workers as Ray actors, used by the service where it would use one `Trainer`.

    It holds no model: only the tokenizer (to build the datums). Attributes of a single `Trainer` that it
    does not have (the model, the optimizer, the low-level primitives) raise AttributeError saying so."""

    def __init__(self, model_dir: str | Path, lora: LoRAConfig, placement: Placement) -> None:
        # Not Trainer.__init__: the model lives in the actors.
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.vocab_size = int(AutoConfig.from_pretrained(model_dir).vocab_size)  # the ids training accepts
        self.model_dir, self.lora, self.placement = str(model_dir), lora, placement
        self.placement_group: Any = None
        self.actors: list[Any] = []  # actor handles: their methods are called with .remote()
        self.broken = False  # a worker failed: the workers start afresh before the next call
        self._state: dict[str, bytes] | None = None  # the files of the last checkpoint saved or loaded

    @classmethod
    def start(cls, model_dir: str | Path, lora: LoRAConfig, placement: Placement) -> RayTrainerGroup:
        try:
            import ray
        except ImportError as e:
            raise ImportError(
                f"{placement.workers} trainer workers (or a Ray address) need Ray, an optional extra: "
                "pip install 'advantage[ray]'. With trainer_workers=1 the trainer runs in this process."
            ) from e
        from ray.util.placement_group import placement_group, remove_placement_group

        group = cls(model_dir, lora, placement)
        cluster.join(placement.ray_address, placement.workers * placement.cpus_per_worker, group)
        bundle = {"CPU": placement.cpus_per_worker}
        if placement.gpus_per_worker > 0:
            bundle["GPU"] = placement.gpus_per_worker
        pg = placement_group([dict(bundle) for _ in range(placement.workers)], strategy="PACK")
        try:
            ray.get(pg.ready(), timeout=READY_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(pg)
            cluster.leave(group)
            raise RuntimeError(
                f"The Ray cluster has no room for {placement.workers} trainer workers of {bundle} each after "
                f"{READY_TIMEOUT_S:.0f} s (cluster resources: {ray.cluster_resources()}). Ask for fewer workers "
                "or fewer CPUs/GPUs per worker."
            ) from None
        group.placement_group = pg
        try:
            group._spawn()
        except BaseException:
            group.close()
            raise
        return group

    def _spawn(self) -> None:
        """Start one actor per bundle and have them form the torch.distributed group."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pl = self.placement
        remote = ray.remote(TrainerActor)
        self.actors = [
            remote.options(
                num_cpus=pl.cpus_per_worker,
                num_gpus=pl.gpus_per_worker,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.placement_group, placement_group_bundle_index=i
                ),
            ).remote()
            for i in range(pl.workers)
        ]
        init: str = ray.get(self.actors[0].rendezvous.remote())
        threads = max(1, int(pl.cpus_per_worker))
        gpu = pl.gpus_per_worker > 0
        specs = [GroupSpec(r, pl.workers, init) for r in range(pl.workers)]
        ray.get(
            [
                a.setup.remote(self.model_dir, self.lora, spec, pl.dtype, gpu, threads)
                for a, spec in zip(self.actors, specs, strict=True)
            ]
        )

    def _ensure_workers(self) -> None:
        """After a failure: stop every worker (the survivors' group is broken too), start new ones, and load
        the last checkpoint saved or loaded, i.e. the last step the service published."""
        if not self.broken:
            return
        import ray

        for a in self.actors:
            ray.kill(a)
        self._spawn()
        if self._state is not None:
            files = ray.put(self._state)
            ray.get([a.load_files.remote(files) for a in self.actors])
        self.broken = False

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(
            f"{name!r} is not available with data-parallel trainer workers (trainer_workers > 1): the model "
            "lives in the workers. The low-level API and SFT need trainer_workers=1."
        )

    def _all(self, calls: list[Any], what: str) -> list[Any]:
        """Every call's result; the first failure raises at once (the others may wait on the dead worker in
        a collective), and the workers restart before the next call."""
        import ray

        try:
            pending = list(calls)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done)
            return list(ray.get(calls))
        except ray.exceptions.RayError as e:
            self.broken = True
            raise RuntimeError(
                f"A data-parallel trainer worker failed during {what}; nothing was saved or published, and "
                f"the next call restarts the workers from the last checkpoint. Cause: {e}"
            ) from e

    def train_step(
        self,
        groups: list[TrajectoryGroup],
        config: TrainConfig,
        progress: Progress | None = None,
        step: int = 0,
    ) -> dict[str, float]:
        """`grpo.train_step`, data-parallel over the workers: the same metrics, plus `trainer_workers`."""
        import ray

        t0 = time.perf_counter()
        datums, metrics, mean_over = step_datums(self, groups, config, t0)
        if not datums:
            return metrics
        self._ensure_workers()
        ref = ray.put(datums)  # one copy in the object store, read by every worker
        calls = [a.train_datums.remote(ref, config, step, mean_over) for a in self.actors]
        results = self._all(calls, f"step {step + 1}")
        if progress:
            progress(1, 1)
        metrics.update(results[0])
        metrics.update(seconds=time.perf_counter() - t0)
        metrics["tokens_per_second"] = metrics["sequence_tokens"] / metrics["seconds"]
        return metrics

    def save(self, out: Path) -> None:
        self._ensure_workers()
        files: dict[str, bytes] = self._all([self.actors[0].save_files.remote()], "a checkpoint save")[0]
        for name, data in files.items():
            (out / name).write_bytes(data)
        self._state = files

    def load(self, src: Path) -> None:
        import ray

        state = {p.name: p.read_bytes() for p in Path(src).iterdir() if p.is_file()}
        self._state = state  # a restart reloads it, whether or not this load completes
        self._ensure_workers()
        files = ray.put(state)
        self._all([a.load_files.remote(files) for a in self.actors], "a checkpoint load")

    def adapter_states(self) -> list[dict[str, Any]]:
        """Each worker's adapter weights (for tests: they must be equal)."""
        self._ensure_workers()
        return self._all([a.adapter_state.remote() for a in self.actors], "a state read")

    def close(self) -> None:
        """Stop the workers and free their placement group. The last group on a local cluster that a group
        started shuts it down; a cluster joined by address stays up."""
        import ray

        if not ray.is_initialized() or self.placement_group is None:
            return
        from ray.util.placement_group import remove_placement_group

        for a in self.actors:
            ray.kill(a)
        self.actors = []
        remove_placement_group(self.placement_group)
        self.placement_group = None
        cluster.leave(self)


def trainer_factory(placement: Placement) -> Callable[[Path, LoRAConfig], Trainer] | None:
    """What `Service(trainer_factory=...)` takes for this placement; None (the in-process `Trainer`) when it
    needs no Ray."""
    if not placement.uses_ray:
        return None
    return lambda model_dir, lora: RayTrainerGroup.start(model_dir, lora, placement)
