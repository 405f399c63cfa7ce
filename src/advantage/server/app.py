"""The FastAPI app: OpenAI-compatible inference routes over a `Service`.

Auth is a middleware rather than a per-route dependency, so a route added later is protected without
anyone remembering to: with a key configured, every path except `/health` needs `Authorization: Bearer KEY`
(compared in constant time). Errors use OpenAI's shape, so the official SDK raises its usual exceptions.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from advantage.server import completions, training_routes
from advantage.server.schemas import APIError, ChatCompletionRequest, error_response
from advantage.service import Service

log = logging.getLogger(__name__)
OPEN_PATHS = frozenset({"/health"})
MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_TRAIN_BODY_BYTES = 256 * 1024 * 1024  # a batch of groups with token ids and logprobs is large


def create_app(service: Service, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="advantage", version="0.1.0")
    app.state.service = service

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if api_key and request.url.path not in OPEN_PATHS:
            header = request.headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                return error_response(
                    401,
                    "Missing or wrong API key: send 'Authorization: Bearer <key>'.",
                    "authentication_error",
                )
        length = request.headers.get("content-length")
        limit = MAX_TRAIN_BODY_BYTES if request.url.path.startswith("/v1/training/") else MAX_BODY_BYTES
        if length and length.isdigit() and int(length) > limit:
            return error_response(413, f"Request body over {limit} bytes; send less per request.")
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return error_response(
            400, f"Invalid request: {where}: {first.get('msg', 'bad value')}", param=where or None
        )

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, f"Internal error: {type(exc).__name__}: {exc}", "server_error")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = [
            {"id": n, "object": "model", "created": 0, "owned_by": "advantage"}
            for n in service.served_names()
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(req: ChatCompletionRequest) -> dict[str, Any] | StreamingResponse:
        prepared = completions.prepare(service, req)
        if req.stream:
            return StreamingResponse(completions.stream(prepared), media_type="text/event-stream")
        return await completions.complete(prepared)

    app.include_router(training_routes.router)
    return app
