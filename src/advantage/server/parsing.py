"""Request bodies are parsed off the event loop.

FastAPI parses a JSON body with `await request.json()` on the event loop: for a body of megabytes that is
tens to hundreds of milliseconds in which `/health` and every other client wait. Routes built with
`OffLoopRoute` get a request whose `json()` runs `json.loads` on a worker thread (FastAPI's documented way to
customise the request: a custom `APIRoute` class). Rendering, tokenizing, grammar compiling and adapter
loading happen on threads in the routes themselves.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute


class _OffLoopRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            self._json = await asyncio.to_thread(json.loads, body)
        return self._json


class OffLoopRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def parse_off_loop(request: Request) -> Response:
            return await handler(_OffLoopRequest(request.scope, request.receive))

        return parse_off_loop
