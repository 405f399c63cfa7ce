"""N engine replicas placed as Ray actors, behind the one-engine contract (`engine/base.py`).

`RayEngineReplicas.start(model_dir, placement, engine_kwargs)` joins the Ray cluster (`cluster.py`: the one
at `placement.ray_address`, or a local one), reserves one placement-group bundle per replica (CPUs and GPUs
per replica configurable; PACK: on as few nodes as fit) and starts a `ReplicaActor` in each: a
`TorchEngine` for the base model, which Ray restarts if its process dies (`max_restarts`). This process
holds the router, the tokenizer and the grammar compiler only, so a request is checked (context, grammar,
adapter name) before it is queued, as with one engine.

- Routing: prefix affinity, else the least-loaded replica (`engine/routing.py`). At most
  `max_pending + max_batch_size` requests are in flight per replica; past that on every replica, `submit`
  raises `QueueFull`.
- Adapters: `load_adapter` sends the adapter's files to every live replica through Ray's object store (the
  replicas need no shared directory, only the base model at the same path) and returns once each has loaded
  it: the service announces `name@step` after that, so a request for it reaches only replicas that have it.
  The router remembers name -> directory; a replica that Ray restarted loads every current adapter before it
  is given a request. The replicas write the files to a scratch directory of the set (`scratch`, in the
  system's temp dir), removed on `close` whatever became of the replicas.
- Faults: a request whose replica died (or restarted under it) is sent once more, to another live replica;
  if that fails too, its future fails with `ReplicaUnavailable` (the server answers 500, which the OpenAI
  client retries and `gather_trajectory_groups` counts as a failed rollout). A replica is known to have
  restarted by its process id, which every reply carries.
- Streaming: a request with `on_token` runs the actor's `generate_stream` as a Ray streaming generator
  (`num_returns="streaming"`): the replica yields the text as its engine decodes it (a token's text per item
  when this side keeps up, a few tokens' when it lags), and one event loop thread here (`_streams`) reads
  every stream and calls `on_token` in order. A request without `on_token` gets one reply. Text that reached
  `on_token` cannot be taken back, so a streamed request whose replica dies is retried on another replica
  only if none of its text was streamed yet; after that it fails with `ReplicaUnavailable` (retryable: the
  client sends the whole request again), so no text is ever streamed twice.

Ray is imported only when replicas start: with one replica and no address nothing imports it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from transformers import AutoConfig, AutoTokenizer

from advantage import cluster
from advantage.engine.base import Completion, EngineFactory, QueueFull, Scores, TokenCallback
from advantage.engine.grammar import GrammarCompiler
from advantage.engine.replica_actor import ReplicaActor
from advantage.engine.routing import PrefixRouter
from advantage.engine.rows import check_fits, check_sequences, settle
from advantage.engine.sampling import SamplingParams

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 300.0  # how long the cluster may take to place and load every replica
REVIVE_TIMEOUT_S = 600.0  # how long a lost replica may take to come back before it is given up
RETRY_AFTER_S = 1


class ReplicaUnavailable(RuntimeError):
    """The replica serving a request died, and so did the retry's (or no replica is live): try again later."""


@dataclass(frozen=True)
class ReplicaPlacement:
    """Where the engine replicas run."""

    replicas: int = 1
    """Engine replicas (Ray actors) per base model; 1 keeps the in-process engine and never imports Ray."""
    ray_address: str | None = None
    """A Ray cluster to join ("auto", "ray://host:10001", "host:6379"); None starts a local one."""
    cpus_per_replica: float = 1.0
    """CPUs each replica reserves in its placement-group bundle (also its torch thread count, at least 1)."""
    gpus_per_replica: float = 0.0
    """GPUs each replica reserves; > 0 puts its engine on CUDA."""
    max_restarts: int = 3
    """How often Ray restarts a replica whose process died."""

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"engine replicas must be >= 1, got {self.replicas}.")
        if self.cpus_per_replica <= 0 or self.gpus_per_replica < 0 or self.max_restarts < 0:
            raise ValueError("cpus_per_replica must be > 0, gpus_per_replica and max_restarts >= 0.")

    @property
    def uses_ray(self) -> bool:
        return self.replicas > 1 or self.ray_address is not None


@dataclass
class _Call:
    """One request on its way through the replicas: `method` of the actor with `args`, at most `tries` times."""

    method: str
    args: tuple[Any, ...]
    prompt: list[int]
    out: concurrent.futures.Future[Any]
    on_token: TokenCallback | None = None
    tries: int = 2
    ref: Any = None  # the ObjectRef (ObjectRefGenerator when streamed) of the attempt in flight
    failed: list[int] = field(default_factory=list)  # replicas that lost it
    streamed: bool = False  # some text reached on_token: a retry would stream it twice


class RayEngineReplicas:
    """N `TorchEngine` replicas as Ray actors, used by the service where it would use one engine."""

    def __init__(
        self, model_dir: str | Path, placement: ReplicaPlacement, engine_kwargs: dict[str, Any]
    ) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.vocab_size = int(AutoConfig.from_pretrained(model_dir).vocab_size)
        self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size)
        self.model_dir, self.placement, self.engine_kwargs = str(model_dir), placement, dict(engine_kwargs)
        self.router = PrefixRouter()
        self.placement_group: Any = None
        self.scratch: Path | None = None  # the replicas' adapter files (replica_actor.py), removed on close
        self.actors: list[Any] = []
        self.pids: list[int] = []  # each replica's process as last seen: another pid is a restart
        self.context_len = self.default_max_tokens = self.max_in_flight = 0
        self._lock = threading.RLock()
        self._ready: set[int] = set()  # replicas that hold every current adapter and take requests
        self._in_flight: list[int] = []
        self._adapters: dict[str, Path] = {}  # name -> directory, what every ready replica has loaded
        self._version = 0  # bumped on every change of _adapters, so a reviving replica sees one it missed
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None  # reads the streamed requests (`_streams`)
        self._loop_thread: threading.Thread | None = None
        self.stats = {"requests_retried": 0, "streams_broken": 0, "replicas_lost": 0, "replicas_back": 0}

    @classmethod
    def start(
        cls, model_dir: str | Path, placement: ReplicaPlacement, engine_kwargs: dict[str, Any] | None = None
    ) -> RayEngineReplicas:
        engine = cls(model_dir, placement, engine_kwargs or {})
        cluster.join(placement.ray_address, placement.replicas * placement.cpus_per_replica, engine)
        try:
            engine._spawn()
        except BaseException:
            engine.close()
            raise
        return engine

    def _spawn(self) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pl = self.placement
        bundle = {"CPU": pl.cpus_per_replica}
        if pl.gpus_per_replica > 0:
            bundle["GPU"] = pl.gpus_per_replica
        self.placement_group = placement_group([dict(bundle) for _ in range(pl.replicas)], strategy="PACK")
        try:
            ray.get(self.placement_group.ready(), timeout=READY_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(
                f"The Ray cluster has no room for {pl.replicas} engine replicas of {bundle} each after "
                f"{READY_TIMEOUT_S:.0f} s (cluster resources: {ray.cluster_resources()}). Ask for fewer "
                "replicas or fewer CPUs/GPUs per replica."
            ) from None
        remote = ray.remote(ReplicaActor)
        self.scratch = Path(tempfile.mkdtemp(prefix="advantage-replica-"))
        threads, gpu = max(1, int(pl.cpus_per_replica)), pl.gpus_per_replica > 0
        self.actors = [
            remote.options(
                num_cpus=pl.cpus_per_replica,
                num_gpus=pl.gpus_per_replica,
                max_restarts=pl.max_restarts,
                max_task_retries=0,  # a request is retried here, on another replica
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.placement_group, placement_group_bundle_index=i
                ),
            ).remote(self.model_dir, self.engine_kwargs, threads, gpu, str(self.scratch), i)
            for i in range(pl.replicas)
        ]
        limits = ray.get([a.limits.remote() for a in self.actors], timeout=READY_TIMEOUT_S)
        self.pids = [pid for pid, *_ in limits]
        _, self.context_len, self.default_max_tokens, self.max_in_flight = limits[0]
        self._in_flight = [0] * pl.replicas
        self._ready = set(range(pl.replicas))

    # ---------------------------------------------------------------- the contract
    def check_fits(self, prompt_len: int, max_tokens: int | None) -> int:
        return check_fits(self.context_len, self.default_max_tokens, prompt_len, max_tokens)

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        adapter: str | None = None,
        on_token: TokenCallback | None = None,
    ) -> concurrent.futures.Future[list[Completion]]:
        """`Engine.submit` on the routed replica; with `on_token`, streamed as the replica decodes."""
        self.check_fits(len(prompt_ids), params.max_tokens)
        if params.grammar is not None:
            self.grammars.validate(params.grammar)
        self._check_adapter(adapter)
        out: concurrent.futures.Future[list[Completion]] = concurrent.futures.Future()
        prompt = list(prompt_ids)
        self._dispatch(_Call("generate", (prompt, params, adapter), prompt, out, on_token), first=True)
        return out

    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        adapter: str | None = None,
        on_token: TokenCallback | None = None,
    ) -> list[Completion]:
        return await asyncio.wrap_future(self.submit(prompt_ids, params, adapter, on_token))

    def score(
        self, sequences: list[list[int]], adapter: str | None = None, top_k: int = 0
    ) -> concurrent.futures.Future[Scores]:
        self._check_adapter(adapter)
        check_sequences(sequences, self.context_len, self.vocab_size)
        if top_k < 0:
            raise ValueError(f"top_k is {top_k}; it must be 0 (none) or more.")
        seqs = [list(s) for s in sequences]
        out: concurrent.futures.Future[Scores] = concurrent.futures.Future()
        self._dispatch(_Call("score", (seqs, adapter, top_k), seqs[0] if seqs else [], out), first=True)
        return out

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load `name` on every live replica; returns when each has it. A replica coming back loads it before
        it takes a request."""
        import ray

        files = ray.put(_read_files(Path(path)))
        with self._lock:
            self._check_open()
            previous = self._adapters.get(name)
            self._adapters[name] = Path(path)
            self._version += 1
            targets = sorted(self._ready)
        error = self._on_replicas(targets, lambda a: a.load.remote(name, files))
        if error is not None:
            with self._lock:
                if previous is None:
                    self._adapters.pop(name, None)
                else:
                    self._adapters[name] = previous
                self._version += 1
            raise error

    def remove_adapter(self, name: str) -> None:
        with self._lock:
            path = self._adapters.pop(name, None)
            self._version += 1
            targets = sorted(self._ready)
        if path is None:
            return
        error = self._on_replicas(targets, lambda a: a.remove.remote(name))
        if error is not None:  # busy on some replica: serve it everywhere again, and let the caller retry
            self.load_adapter(name, path)
            raise error

    def adapters(self) -> list[str]:
        with self._lock:
            return list(self._adapters)

    def live(self) -> list[int]:
        """The replicas taking requests: not lost, or back with every current adapter."""
        with self._lock:
            return sorted(self._ready)

    def in_flight(self) -> list[int]:
        """Requests in flight on each replica."""
        with self._lock:
            return list(self._in_flight)

    def close(self) -> None:
        """Kill the replicas (their requests fail, streamed ones too) once each removed its scratch directory,
        stop the thread reading streams, free the placement group and remove the set's scratch directory (what
        a replica killed earlier left there too); `cluster.leave`."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._ready.clear()
        with contextlib.suppress(ImportError):
            import ray

            if ray.is_initialized():
                from ray.util.placement_group import remove_placement_group

                # A replica on another node removes its own; a dead or stuck one is not waited for long.
                if self.actors:
                    with contextlib.suppress(ray.exceptions.RayError):
                        ray.wait(
                            [a.close.remote() for a in self.actors], num_returns=len(self.actors), timeout=10
                        )
                for a in self.actors:
                    ray.kill(a, no_restart=True)
                self._stop_streams()  # before Ray shuts down: a stream it leaves unanswered is failed here
                if self.placement_group is not None:
                    remove_placement_group(self.placement_group)
            cluster.leave(self)
        self._stop_streams()  # if Ray was shut down already
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)

    # ---------------------------------------------------------------- routing and faults
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("engine is closed")

    def _check_adapter(self, adapter: str | None) -> None:
        with self._lock:
            self._check_open()
            if adapter is not None and adapter not in self._adapters:
                raise KeyError(f"adapter {adapter!r} is not loaded")

    def _dispatch(self, call: _Call, first: bool = False) -> None:
        """Send `call` to a replica: the routed one, else the least loaded that has room. On the first try a
        full house is QueueFull (raised); on a retry, no live replica fails the call's future."""
        with self._lock:
            load = {i: self._in_flight[i] for i in self._ready if i not in call.failed}
            if self._closed or not load:
                what = "the engine is closed" if self._closed else "no engine replica is live"
                settle(call.out, ReplicaUnavailable(f"{what}; failed: {call.failed or 'none'}. Retry."))
                return
            i = self.router.affine(call.prompt, set(load))
            if i is None or load[i] >= self.max_in_flight:
                i = min(load, key=lambda r: (load[r], r))
            if load[i] >= self.max_in_flight:
                if first:
                    raise QueueFull(
                        f"Every engine replica is busy ({self.max_in_flight} requests in flight each). Retry "
                        f"in {RETRY_AFTER_S} s, or send fewer requests at once.",
                        RETRY_AFTER_S,
                    )
                settle(call.out, ReplicaUnavailable("every live engine replica is full; retry"))
                return
            self.router.record(call.prompt, i)
            self._in_flight[i] += 1
            call.tries -= 1
            if call.on_token is None:
                call.ref = getattr(self.actors[i], call.method).remote(*call.args)
            else:
                stream = self.actors[i].generate_stream.options(num_returns="streaming")
                call.ref = stream.remote(*call.args)
        if first:
            call.out.add_done_callback(lambda f: self._cancel(call) if f.cancelled() else None)
        if call.on_token is None:
            call.ref.future().add_done_callback(lambda f: self._answer(call, i, _outcome(f)))
        else:
            asyncio.run_coroutine_threadsafe(self._stream(call, i, call.ref), self._streams())

    def _cancel(self, call: _Call) -> None:
        import ray

        with contextlib.suppress(Exception):
            ray.cancel(call.ref)

    def _streams(self) -> asyncio.AbstractEventLoop:
        """The event loop that reads every streamed request's generator, in a thread of its own."""
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._loop_thread = threading.Thread(
                    target=self._loop.run_forever, name="advantage-replica-streams", daemon=True
                )
                self._loop_thread.start()
            return self._loop

    async def _stream(self, call: _Call, i: int, generator: Any) -> None:
        """Read replica `i`'s stream for `call`: each delta to `on_token` as it comes, then answer the call."""
        on_token = call.on_token
        assert on_token is not None
        outcome: tuple[int, Any] | BaseException = ReplicaUnavailable(
            f"engine replica {i} ended a stream early"
        )
        try:
            async for ref in generator:
                pid, deltas, result = await ref
                if not call.out.done():  # not cancelled
                    for index, text in deltas:
                        call.streamed = True
                        on_token(index, text)
                if result is not None:
                    outcome = (pid, result)
        except asyncio.CancelledError:  # close(): the loop stops
            outcome = ReplicaUnavailable("the engine closed while the request streamed; retry")
        except BaseException as e:  # the replica died, or its engine raised
            outcome = e
        self._answer(call, i, outcome)

    def _stop_streams(self) -> None:
        """Fail the streams still being read (their replicas are gone) and stop the loop reading them."""
        with self._lock:
            loop, thread = self._loop, self._loop_thread
            self._loop = self._loop_thread = None
        if loop is None or thread is None:
            return

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(cancel_all(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)

    def _answer(self, call: _Call, i: int, outcome: tuple[int, Any] | BaseException) -> None:
        """An attempt on replica `i` ended with (pid, result) or an error: answer the call, or mark the
        replica lost and retry elsewhere (not if some of the call's text was streamed already)."""
        import ray

        with self._lock:
            self._in_flight[i] -= 1
        if call.out.done():  # cancelled
            return
        if isinstance(outcome, ray.exceptions.RayTaskError):
            # the engine raised: the replica is lost only if it restarted under us
            if getattr(outcome, "pid", None) in (None, self.pids[i]):
                settle(call.out, outcome.as_instanceof_cause())
                return
        elif not isinstance(outcome, ray.exceptions.RayActorError):
            if isinstance(outcome, BaseException):
                settle(call.out, outcome)
                return
            pid, result = outcome
            if pid != self.pids[i]:
                self._lost(i)  # restarted between requests: its adapters must be loaded again
            settle(call.out, result)
            return
        self._lost(i)
        call.failed.append(i)
        if call.streamed:
            self.stats["streams_broken"] += 1
            settle(
                call.out,
                ReplicaUnavailable(
                    f"engine replica {i} failed a request after streaming part of its text, which cannot be "
                    f"taken back: not retried on another replica. Send the request again ({outcome})."
                ),
            )
        elif call.tries > 0:
            self.stats["requests_retried"] += 1
            log.warning("engine replica %d failed a request (%s); retrying on another", i, outcome)
            self._dispatch(call)
        else:
            settle(
                call.out, ReplicaUnavailable(f"engine replicas {call.failed} failed the request: {outcome}")
            )

    def _on_replicas(self, targets: list[int], send: Any) -> Exception | None:
        """Run one call on each target replica; a dead or restarted one is marked lost (it catches up when it
        comes back). The first error an engine raised is returned."""
        import ray

        refs = {i: send(self.actors[i]) for i in targets}
        error: Exception | None = None
        for i, ref in refs.items():
            try:
                if ray.get(ref) != self.pids[i]:
                    self._lost(i)
            except ray.exceptions.RayActorError:
                self._lost(i)
            except ray.exceptions.RayTaskError as e:
                error = error or e.as_instanceof_cause()
        return error

    def _lost(self, i: int) -> None:
        """Take replica `i` out of routing and bring it back, adapters loaded, in a thread."""
        with self._lock:
            if i not in self._ready or self._closed:
                return  # already being revived
            self._ready.discard(i)
            self.router.forget(i)
            self.stats["replicas_lost"] += 1
        threading.Thread(target=self._revive, args=(i,), name=f"advantage-revive-{i}", daemon=True).start()

    def _revive(self, i: int) -> None:
        """Wait for Ray to restart replica `i`, load every current adapter there, then route to it again."""
        import ray

        deadline = time.monotonic() + REVIVE_TIMEOUT_S
        while not self._closed and time.monotonic() < deadline:
            with self._lock:
                version, wanted = self._version, dict(self._adapters)
            try:
                pid, loaded = ray.get(self.actors[i].adapters.remote(), timeout=REVIVE_TIMEOUT_S)
                for name in set(loaded) - set(wanted):
                    ray.get(self.actors[i].remove.remote(name))
                for name, path in wanted.items():  # reloaded even if loaded: a same-name reload may be newer
                    if path.exists():
                        ray.get(self.actors[i].load.remote(name, _read_files(path)))
            except ray.exceptions.RayError as e:  # not back yet (or died again)
                log.info("engine replica %d is not back yet: %s", i, e)
                time.sleep(1.0)
                continue
            with self._lock:
                if version == self._version and not self._closed:
                    self.pids[i] = pid
                    self._ready.add(i)
                    self.stats["replicas_back"] += 1
                    log.warning("engine replica %d is back (pid %d) with %d adapters", i, pid, len(wanted))
                    return
        log.error("engine replica %d did not come back; the other replicas serve on", i)


def _read_files(path: Path) -> dict[str, bytes]:
    """A PEFT adapter's files in a checkpoint directory (not the optimizer state beside them)."""
    return {p.name: p.read_bytes() for p in path.iterdir() if p.is_file() and p.name.startswith("adapter_")}


def _outcome(done: concurrent.futures.Future[Any]) -> tuple[int, Any] | BaseException:
    """A finished reply's (pid, result), or the error it raised."""
    try:
        return done.result()
    except BaseException as e:
        return e


EngineKind = Literal["torch", "vllm"]  # TorchEngine (CPU or CUDA), VLLMEngine (GPUs; engine/vllm_engine.py)


def engine_factory(
    placement: ReplicaPlacement, engine_kwargs: dict[str, Any] | None = None, kind: EngineKind = "torch"
) -> EngineFactory | None:
    """What `Service(engine_factory=...)` takes for this placement and engine; None (the in-process
    `TorchEngine`) when it needs neither Ray nor vLLM. `engine_kwargs` go to each engine."""
    if kind == "vllm":
        if placement.uses_ray:
            raise ValueError(
                "engine replicas on Ray serve TorchEngine only; vLLM parallelises itself: pass one engine "
                "and vLLM's own options (e.g. tensor_parallel_size) instead of engine_replicas."
            )
        from advantage.engine.vllm_engine import vllm_factory

        return vllm_factory(**(engine_kwargs or {}))
    if kind != "torch":
        raise ValueError(f"engine must be 'torch' or 'vllm', got {kind!r}.")
    if not placement.uses_ray:
        return None
    return lambda model_dir: RayEngineReplicas.start(model_dir, placement, engine_kwargs)
