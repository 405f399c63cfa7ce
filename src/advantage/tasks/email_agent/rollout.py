"""One ART-E episode: the agent searches and reads the (injected) inbox with OpenAI tool calling, and ends
by calling return_final_answer, within `max_turns` model turns.

The prompt is a system message (whose inbox, what day it is, how to answer), ONE worked example exchange
given as plain context messages (search, read, answer, on a made-up email outside every inbox: DESIGN §4
measured that the bundled 135M model makes no correct tool call zero-shot), and the question. A turn
without a tool call ends the episode as a format error; so does return_final_answer with unusable
arguments. Every other bad call gets an error message back and the episode goes on.
"""

from __future__ import annotations

import copy
import json
import time
from typing import Any, Protocol

import openai

from advantage import Trajectory

from .db import inbox_db
from .inbox import generate_inbox
from .judge import AnswerJudge
from .questions import Question
from .reward import Finish, make_rubric, outcome, reward
from .tools import TOOLS, ToolResult, execute

Message = dict[str, Any]
MAX_TURNS = 10

SYSTEM_PROMPT = (
    "You answer questions about the inbox of {owner}. Today is {today}. Search with search_inbox, read "
    "emails with read_email, then call return_final_answer with the answer and the message ids it comes "
    'from. If the inbox does not say, answer "I don\'t know". You have {max_turns} turns.'
)

_EX_ID = "5e0c7a"
_EX_EMAIL = (
    f"Message-ID: {_EX_ID}\nDate: 2023-05-02 09:14\nFrom: travel@example.org\nTo: me@example.org\n"
    "Subject: Trip to Reykjavik: booking confirmation\n\nYour trip to Reykjavik is booked. The flight departs "
    "at 7:05 AM.\nConfirmation code: QX7P2L"
)


def _call(i: int, name: str, args: dict[str, Any]) -> Message:
    call = {
        "id": f"call_ex_{i}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(args)},
    }
    return {"role": "assistant", "content": "", "tool_calls": [call]}


EXAMPLE: list[Message] = [
    {"role": "user", "content": "What is the confirmation code for my trip to Reykjavik?"},
    _call(0, "search_inbox", {"keywords": "confirmation code trip Reykjavik"}),
    {
        "role": "tool",
        "tool_call_id": "call_ex_0",
        "content": json.dumps(
            [
                {
                    "message_id": _EX_ID,
                    "snippet": (
                        "2023-05-02 | travel@example.org | Trip to Reykjavik: booking confirmation | ...Confirmation code: "
                        "QX7P2L"
                    ),
                }
            ]
        ),
    },  # fmt: skip
    _call(1, "read_email", {"message_id": _EX_ID}),
    {"role": "tool", "tool_call_id": "call_ex_1", "content": _EX_EMAIL},
    _call(2, "return_final_answer", {"answer": "QX7P2L", "sources": [_EX_ID]}),
]  # no tool message after the answer: the tiny model copies the last tag it saw, and it must be <tool_call>


class ChatModel(Protocol):
    """What a rollout needs from `advantage.Model` / `advantage.TrainableModel`."""

    def openai_client(self) -> openai.AsyncOpenAI: ...

    def get_inference_name(self) -> str: ...


def initial_messages(question: Question, max_turns: int = MAX_TURNS) -> list[Message]:
    inbox = generate_inbox(question.inbox_seed)
    system = SYSTEM_PROMPT.format(owner=inbox.owner_email, today=inbox.today, max_turns=max_turns)
    return [{"role": "system", "content": system}, *copy.deepcopy(EXAMPLE),
            {"role": "user", "content": question.question}]  # fmt: skip


def _final_answer(results: list[ToolResult]) -> dict[str, Any] | None:
    final = next((r.final for r in results if r.final is not None), None)
    return None if final is None else {"answer": final.answer, "sources": list(final.sources)}


async def rollout(
    model: ChatModel,
    question: Question,
    *,
    temperature: float = 1.0,
    max_turns: int = MAX_TURNS,
    max_tokens: int = 160,
    judge: AnswerJudge | None = None,
    force_tool_calls: bool = True,
) -> Trajectory:
    """Run the agent on one question; the trajectory's metrics hold the rubric, the outcome, tokens and time.

    Every turn of this agent is a tool call (the answer, too, goes through `return_final_answer`), so by
    default each request says `tool_choice="required"`: our server then decodes under a grammar that only
    admits a well-formed call of one of the tools (which tool and what arguments stay the model's choice);
    any OpenAI-compatible server honours the same field."""
    if not 1 <= max_turns <= MAX_TURNS:
        raise ValueError(f"max_turns must be between 1 and {MAX_TURNS}, got {max_turns}")
    db = inbox_db(question.inbox_seed)
    client = model.openai_client()
    traj = Trajectory(
        messages_and_choices=list(initial_messages(question, max_turns)),
        tools=TOOLS,
        metadata={"question_id": question.id, "question": question.to_dict()},
    )
    results: list[ToolResult] = []
    finish: Finish = "max_turns"
    turns = prompt_tokens = completion_tokens = 0
    start = time.perf_counter()
    while turns < max_turns and finish == "max_turns":
        try:
            resp = await client.chat.completions.create(  # type: ignore[call-overload]  # plain dicts
                model=model.get_inference_name(),
                messages=traj.messages(),
                tools=TOOLS,
                tool_choice="required" if force_tool_calls else "auto",
                temperature=temperature,
                max_tokens=max_tokens,
            )
        except openai.BadRequestError as exc:  # the conversation outgrew the context: out of room, like turns
            if "context" not in str(exc):
                raise
            traj.logs.append(f"stopped: {exc}")
            break
        turns += 1
        if resp.usage is not None:
            prompt_tokens += resp.usage.prompt_tokens
            completion_tokens += resp.usage.completion_tokens
        traj.messages_and_choices.append(resp.choices[0])
        calls = traj.messages()[-1].get("tool_calls") or []
        if not calls:
            finish = "no_tool_call"
        for call in calls:
            fn = call.get("function") or {}
            name = str(fn.get("name", ""))
            result = execute(db, name, str(fn.get("arguments") or "{}"))
            results.append(result)
            traj.messages_and_choices.append(
                {"role": "tool", "tool_call_id": call.get("id"), "content": result.content}
            )
            if result.final is not None:
                finish = "answered"
                break
            if name == "return_final_answer":
                finish = "bad_final_args"
                break
    seconds = time.perf_counter() - start

    verdict = None
    answer = _final_answer(results)
    if judge is not None and answer is not None and question.answer is not None:
        rub = make_rubric(question, results, finish, turns)
        if not rub.answer_correct and not rub.answered_idk:
            verdict = await judge.is_correct(question.question, question.answer, answer["answer"])
    rubric = make_rubric(question, results, finish, turns, correct=verdict)
    traj.finish_reason = finish
    traj.reward = reward(rubric, max_turns)
    traj.metadata["final_answer"] = answer
    traj.metadata["outcome"] = outcome(rubric)
    traj.metrics = {
        **rubric.to_metrics(),
        **{f"is_{o}": float(outcome(rubric) == o) for o in ("correct", "wrong", "idk", "no_answer")},
        "prompt_tokens": float(prompt_tokens),
        "completion_tokens": float(completion_tokens),
        "seconds": seconds,
    }
    return traj
