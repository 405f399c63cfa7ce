"""The FastAPI app: OpenAI-compatible inference routes over a `Service`.

Auth, the body limit and cancelling the requests of clients that went away are one middleware in front of
every route (`guard.py`), so a route added later is covered without anyone remembering to. Nothing
CPU-heavy runs on the event loop: bodies are parsed (`parsing.py`), prompts rendered and tokenized, grammars
compiled, adapters loaded and responses encoded on worker threads, so `/health` and every other client keep
their answers coming. Errors use OpenAI's shape, so the official SDK raises its usual exceptions.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from advantage.server import completions, feedback_routes, training_routes
from advantage.server.guard import MAX_BODY_BYTES, MAX_TRAIN_BODY_BYTES, OPEN_PATHS, Guard
from advantage.server.parsing import OffLoopRoute
from advantage.server.schemas import (
    ERROR_SCHEMA,
    INTERNAL_ERROR,
    APIError,
    ChatCompletionRequest,
    error_response,
)
from advantage.server.training_routes import OP_ROUTES
from advantage.service import Service

log = logging.getLogger(__name__)
__all__ = ["MAX_BODY_BYTES", "MAX_TRAIN_BODY_BYTES", "OPEN_PATHS", "create_app"]


def create_app(service: Service, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="advantage", version="0.1.0")
    app.router.route_class = OffLoopRoute
    app.state.service = service
    app.add_middleware(Guard, api_key=api_key)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        if not where:  # the body itself: missing, not JSON, or not an object
            message = f"Invalid request body: {first.get('msg', 'bad value')}; send a JSON object."
            return error_response(400, message)
        loc = [x for x in first.get("loc", ()) if x != "body"]
        if (
            len(loc) > 2 and loc[0] == "groups" and isinstance(loc[1], int)
        ):  # as /train, /log and /datums say it
            rest = ".".join(str(x) for x in loc[2:])
            message = f"Group {loc[1]} does not read as TrajectoryGroup.to_dict(): {rest}: {first.get('msg')}"
            return error_response(400, message, param=f"groups.{loc[1]}")
        return error_response(400, f"Invalid request: {where}: {first.get('msg', 'bad value')}", param=where)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        """Starlette's own errors (no such route, wrong method) in OpenAI's shape too."""
        if exc.status_code == 404:
            message = f"No route {request.url.path}; the routes are listed at /openapi.json."
        elif exc.status_code == 405:
            allow = (exc.headers or {}).get("Allow", "")
            message = f"{request.method} is not allowed on {request.url.path}; use {allow}."
        elif exc.status_code == 400:  # FastAPI could not read the body (e.g. JSON nested past the parser)
            message = f"Invalid request body ({exc.detail}): send a JSON object, not nested hundreds deep."
        else:
            message = str(exc.detail)
        response = error_response(exc.status_code, message)
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        # The traceback goes to the server's log only: an exception's text can hold paths and internals.
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, INTERNAL_ERROR, "server_error")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        names = await asyncio.to_thread(service.served_names)  # waits while a register loads an engine
        data = [{"id": n, "object": "model", "created": 0, "owned_by": "advantage"} for n in names]
        return {"object": "list", "data": data}

    @app.post(
        "/v1/chat/completions", response_model=None, responses={200: {"content": {"text/event-stream": {}}}}
    )
    async def chat_completions(req: ChatCompletionRequest) -> Response:
        prepared = await asyncio.to_thread(completions.prepare, service, req)
        if req.stream:
            return StreamingResponse(completions.stream(prepared), media_type="text/event-stream")
        return await completions.complete(prepared)

    app.include_router(training_routes.router)
    app.include_router(feedback_routes.router)
    _document_errors(app)
    return app


def _document_errors(app: FastAPI) -> None:
    """Make the OpenAPI document say which errors each route answers, all in OpenAI's shape.

    FastAPI documents a 422 for every route with input, but `bad_request` answers 400. Like the auth
    middleware, this goes by the route's shape, so a new route is documented without anyone remembering to."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        spec = generate()
        spec.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
        error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
        for path, operations in spec.get("paths", {}).items():
            for op in operations.values():
                responses = op.setdefault("responses", {})
                responses.pop("422", None)
                codes: dict[str, str] = {}
                if path not in OPEN_PATHS:
                    codes["401"] = "Missing or wrong API key (when the server has one)."
                if "requestBody" in op or op.get("parameters"):
                    codes["400"] = "Invalid request: the message says which field and why."
                    codes["404"] = "Unknown model (or route)."
                if "requestBody" in op:
                    codes["413"] = "Request body too large."
                if path == "/v1/chat/completions" or path.rpartition("/")[2] in {"train", *OP_ROUTES}:
                    codes["429"] = (
                        "The engine's or the training queue is full; retry after Retry-After seconds."
                    )
                for code, description in codes.items():
                    responses.setdefault(code, {"description": description, "content": error})
        app.openapi_schema = spec
        return spec

    app.openapi = openapi  # type: ignore[method-assign]
