"""Run the app with uvicorn: in the foreground (`advantage serve`) or on a background thread on a free
loopback port (LocalBackend, tests)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from advantage.server.app import create_app
from advantage.service import Service


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class BackgroundServer:
    """The real HTTP server on 127.0.0.1, in this process, on its own thread and event loop."""

    def __init__(self, service: Service, api_key: str | None = None, host: str = "127.0.0.1", port: int = 0):
        self.host, self.port = host, port or free_port(host)
        config = uvicorn.Config(
            create_app(service, api_key),
            host=self.host,
            port=self.port,
            log_level="warning",
            timeout_keep_alive=30,
        )
        self._server = uvicorn.Server(config)
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
    uvicorn.run(create_app(service, api_key), host=host, port=port, log_level="info")
