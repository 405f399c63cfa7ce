"""`POST /v1/feedback`: a reward (or a label) for a recorded chat completion's choice.

    {"completion_id": "chatcmpl-...", "choice": 0, "reward": 0.8}
    {"completion_id": "chatcmpl-...", "label": "thumbs_up", "comment": "right answer", "model": "my-agent"}
answers
    {"completion_id": ..., "choice": 0, "reward": 1.0, "label": "thumbs_up", "episode": null, "choices": 1}

The rules (labels, idempotency, episodes, errors) are `online/feedback.py`'s. `model` is optional: with it
only that model's store is searched, and a model the server does not know (say, after a restart, before the
client registered again) is a 404 `model_not_registered`, which `RemoteBackend` answers by registering and
sending again. Auth and the body limit are the app's middleware, as for every route.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from advantage.online.feedback import FeedbackError, give_feedback
from advantage.registry import check_name
from advantage.server.parsing import OffLoopRoute
from advantage.server.schemas import APIError, ErrorType
from advantage.server.training_routes import api_error
from advantage.service import Service

router = APIRouter(prefix="/v1", route_class=OffLoopRoute)


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    completion_id: str = Field(description="The `id` of a chat completion served with recording on.")
    choice: int = Field(0, description="The index of the rated choice (for n > 1).")
    reward: float | None = Field(None, description="The reward: a finite number. Send this or `label`.")
    label: str | None = Field(
        None,
        description="Instead of a reward: 'up'/'thumbs_up'/'good' (1.0) or 'down'/'thumbs_down'/'bad' (0.0).",
    )
    comment: str | None = Field(
        None, description="Free text kept with the feedback (at most 4,000 characters)."
    )
    model: str | None = Field(
        None, description="The trainable model that served it (optional: narrows the search)."
    )


class FeedbackResponse(BaseModel):
    completion_id: str
    choice: int
    reward: float = Field(description="The reward recorded (the label's, for a label).")
    label: str | None
    episode: str | None = Field(description="The episode tag (as JSON) when the feedback covered an episode.")
    choices: int = Field(description="How many recorded choices now carry this feedback.")


@router.post("/feedback")
async def feedback(body: FeedbackBody, request: Request) -> FeedbackResponse:
    service: Service = request.app.state.service

    def run() -> FeedbackResponse:
        if body.model is not None:
            check_name("model name", body.model)
        stores = service.traffic_stores(body.model)
        result = give_feedback(
            stores,
            body.completion_id,
            choice=body.choice,
            reward=body.reward,
            label=body.label,
            comment=body.comment,
        )
        return FeedbackResponse(**vars(result))

    try:
        return await asyncio.to_thread(run)  # SQLite reads and writes block
    except FeedbackError as exc:
        type_: ErrorType = "not_found_error" if exc.status == 404 else "invalid_request_error"
        code = "completion_not_found" if exc.status == 404 else None
        raise APIError(exc.status, exc.message, type_, exc.param, code) from None
    except Exception as exc:
        raise api_error(exc) from exc
