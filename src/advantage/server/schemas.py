"""Request bodies of the OpenAI-compatible routes, and OpenAI's error shape.

Unknown request fields are ignored (the official SDKs send fields we do not use); known fields are
validated, and a bad value is a 400 in OpenAI's error shape, never a 500.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from advantage.engine.base import QueueFull


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    temperature: float | None = Field(default=None, description="0..2; default 1")
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    # torch seeds are 64-bit; OpenAI documents the same int64 range. A larger one failed inside the engine.
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    # Recorded with the completion when the model records its traffic; `metadata["episode"]` ties the
    # completions of one multi-turn episode together for feedback (`online/feedback.py`).
    metadata: dict[str, Any] | None = None
    user: str | None = None


# What a 500 says: the details are in the server's log, never in the response.
INTERNAL_ERROR = (
    "Internal server error; the server's log has the details. Retry, or report it if it persists."
)


ErrorType = Literal[
    "invalid_request_error", "authentication_error", "not_found_error", "rate_limit_error", "server_error"
]


class APIError(Exception):
    """An error to return in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: ErrorType = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        response = error_response(self.status, self.message, self.type, self.param, self.code)
        response.headers.update(self.headers)
        return response


def queue_full(exc: QueueFull) -> APIError:
    """A full engine or training queue: 429, and when to try again (the OpenAI SDK honours Retry-After)."""
    return APIError(
        429, str(exc), "rate_limit_error", code="queue_full", headers={"Retry-After": str(exc.retry_after)}
    )


# OpenAI's error body, as JSON schema: the OpenAPI document says every 4xx has this shape.
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string", "description": "What went wrong and what to do about it."},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def error_response(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    # A message may quote the request, which may hold a lone surrogate: JSON in UTF-8 cannot carry one.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    if param is not None:
        param = param.encode("utf-8", "backslashreplace").decode("utf-8")
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(status_code=status, content=body)
