"""Run the app with uvicorn: in the foreground (`advantage serve`) or on a background thread on a free
loopback port (LocalBackend, tests).

uvicorn's access log prints each request's path with its query string, so a client that sends its key as
`?api_key=...` would put it in the log: `RedactSecrets` writes `***` for the values of key-like query
parameters, and for the server's key wherever it appears in a line."""

from __future__ import annotations

import copy
import logging
import socket
import threading
import time
from typing import Any
from urllib.parse import quote, quote_plus, unquote_plus

import uvicorn

from advantage.server.app import create_app
from advantage.server.config import ServeConfig
from advantage.service import Service

SECRET_PARAMS = frozenset({"api_key", "api-key", "apikey", "key", "token", "access_token"})


class RedactSecrets(logging.Filter):
    """A filter for uvicorn's access logger (its records carry (client, method, path, version, status))."""

    def __init__(self, api_key: str | None = None) -> None:
        super().__init__()
        self.secrets = [s for s in {api_key, quote(api_key or ""), quote_plus(api_key or "")} if s]

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self.redact(a) if isinstance(a, str) else a for a in record.args)
        return True

    def redact(self, text: str) -> str:
        path, sep, query = text.partition("?")
        if sep:
            parts = []
            for part in query.split("&"):
                name, eq, _ = part.partition("=")
                parts.append(f"{name}=***" if eq and unquote_plus(name).lower() in SECRET_PARAMS else part)
            text = f"{path}?{'&'.join(parts)}"
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


def log_config(api_key: str | None) -> dict[str, Any]:
    """uvicorn's logging config, with `RedactSecrets` on the access log."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config.setdefault("filters", {})["redact"] = {"()": RedactSecrets, "api_key": api_key}
    config["loggers"]["uvicorn.access"]["filters"] = ["redact"]
    return config


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _config(service: Service, api_key: str | None, host: str, port: int, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(
        create_app(service, api_key),
        host=host,
        port=port,
        log_level=log_level,
        log_config=log_config(api_key),
        timeout_keep_alive=30,
    )


class BackgroundServer:
    """The real HTTP server on 127.0.0.1, in this process, on its own thread and event loop."""

    def __init__(self, service: Service, api_key: str | None = None, host: str = "127.0.0.1", port: int = 0):
        self.host, self.port = host, port or free_port(host)
        self._server = uvicorn.Server(_config(service, api_key, self.host, self.port, "warning"))
        self._thread = threading.Thread(target=self._server.run, name="advantage-server", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.host}:{self.port}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


def serve_forever(service: Service, host: str, port: int, api_key: str | None) -> None:
    uvicorn.Server(_config(service, api_key, host, port, "info")).run()


def service_of(config: ServeConfig) -> Service:
    """The `Service` that `advantage serve` runs for `config`: its engines (in this process, as Ray replicas,
    or vLLM) and trainers (in this process, or data-parallel Ray workers), the base models loaded. Raises
    ValueError (or ImportError, naming the extra to install) for a placement that cannot run here."""
    from advantage import cluster
    from advantage.engine.replicas import ReplicaPlacement, engine_factory
    from advantage.training.ray_workers import Placement, trainer_factory

    c = config
    trainers = Placement(c.trainer_workers, c.ray_address, c.cpus_per_trainer, c.gpus_per_trainer)
    replicas = ReplicaPlacement(c.engine_replicas, c.ray_address, c.cpus_per_engine, c.gpus_per_engine)
    if c.uses_ray:  # one cluster with room for both, held until the process exits
        cpus = c.trainer_workers * c.cpus_per_trainer + c.engine_replicas * c.cpus_per_engine
        cluster.join(c.ray_address, cpus, service_of)
    engine_kwargs: dict[str, object] = {"max_pending": c.max_pending}
    if c.engine_threads is not None:
        engine_kwargs["threads"] = c.engine_threads
    service = Service(
        c.root,
        engine_kwargs=engine_kwargs,
        model_dirs=c.model_dir,
        max_train_queue=c.max_train_queue,
        record_traffic=c.record,
        background_samples=c.background_samples,
        engine_factory=engine_factory(replicas, engine_kwargs, c.engine),
        trainer_factory=trainer_factory(trainers),
    )
    for name in c.base_model:
        service.engine(name)
    return service


def serve(config: ServeConfig) -> None:
    """`advantage serve`: serve `config.base_model` and every adapter trained on it through the
    OpenAI-compatible API and the training routes, in the foreground until interrupted."""
    serve_forever(service_of(config), config.host, config.port, config.api_key)
