"""What every request passes before its route: the API key, the size of its body, and its client staying.

One plain ASGI middleware in front of every route, so a route added later is covered without anyone
remembering to:
- **Key.** With a key configured, every path except `/health` needs `Authorization: Bearer KEY` (compared
  in constant time). It is checked before any of the body is read.
- **Body size.** The limit counts the bytes actually received, so a chunked body (no Content-Length) or one
  longer than its Content-Length is refused as surely as a declared one: a 413 as soon as the count passes
  `MAX_BODY_BYTES` (`MAX_TRAIN_BODY_BYTES` under `/v1/training/`). The body is read whole before the route
  runs; every route parses it whole anyway.
- **Client gone.** When the client goes away before its answer is complete, the route's task is cancelled:
  a chat completion or sample awaiting the engine then cancels its request, whose rows leave the batch at
  the next decode step (`TorchEngine`), and a job still queued for the training thread is dropped. A train
  step that has started completes (see `training_routes`).
Errors are in OpenAI's shape, as everywhere.
"""

from __future__ import annotations

import asyncio
import hmac
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from advantage.server.schemas import error_response

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = frozenset({"/health"})
MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_TRAIN_BODY_BYTES = 256 * 1024 * 1024  # a batch of groups with token ids and logprobs is large
_GONE = object()  # the client disconnected while sending its body


def body_limit(path: str) -> int:
    return MAX_TRAIN_BODY_BYTES if path.startswith("/v1/training/") else MAX_BODY_BYTES


class Guard:
    def __init__(self, app: ASGIApp, api_key: str | None = None) -> None:
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key and scope["path"] not in OPEN_PATHS and not self._authorized(headers):
            message = "Missing or wrong API key: send 'Authorization: Bearer <key>'."
            await error_response(401, message, "authentication_error")(scope, receive, send)
            return
        limit = body_limit(scope["path"])
        declared = headers.get("content-length", "")
        body: bytes | object | None = None
        if not (re.fullmatch(r"[0-9]{1,20}", declared) and int(declared) > limit):
            body = await _read_body(receive, limit)
        if body is _GONE:
            return
        if not isinstance(body, bytes):
            message = f"Request body over {limit} bytes; send less per request."
            await error_response(413, message)(scope, receive, send)
            return
        await _run_until_gone(self.app, scope, body, receive, send)

    def _authorized(self, headers: dict[str, str]) -> bool:
        assert self.api_key is not None
        header = headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        return hmac.compare_digest(given.encode(), self.api_key.encode())


async def _read_body(receive: Receive, limit: int) -> bytes | object | None:
    """The whole body; None once it passes `limit` bytes (the rest is never read), or _GONE."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return _GONE
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _run_until_gone(app: ASGIApp, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
    """Run the app on the body read; cancel it if the client disconnects before its response is complete."""
    gone = asyncio.Event()
    state = {"body_given": False, "response_done": False}

    async def replay() -> Message:
        if not state["body_given"]:
            state["body_given"] = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def tracked_send(message: Message) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            state["response_done"] = True
        await send(message)

    async def until_disconnect() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(app(scope, replay, tracked_send))
    watcher = asyncio.ensure_future(until_disconnect())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():  # the client went away (or the response just completed)
            gone.set()
            if not state["response_done"]:
                task.cancel()
            await asyncio.wait({task})
    finally:
        watcher.cancel()
        if not task.done():  # this middleware itself was cancelled (the server is shutting down)
            task.cancel()
    if not task.cancelled():
        task.result()  # the app's own exception, for the server's error handling
