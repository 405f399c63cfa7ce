"""One episode of the tool-use task: ask, let the model call tools, feed back the results, grade the answer.

The prompt is a short system message, ONE worked example exchange given as plain context messages, and the
question. The example asks four things at once, so the one exchange shows a call to each tool, the four
results and the answer.

Measured on the bundled SmolLM2-135M-Instruct (first tool call fully right: tool and arguments; 64 samples
over 32 val questions): 2-3% at T=1.0, 16% at T=0.7, 27% at T=0.5. Whole greedy episodes (T=0) succeed on
8/32 val questions (mean reward 0.45); sampled at T=1.0 they succeed on 0/64 (mean reward 0.02, nearly all
of it the format credit). An example that shows only get_weather gets 0/32 right calls even at
T=0.7. Pick the rollout temperature with this in mind. (Those numbers predate the strict schemas and the
forced first call; with both, as the demo runs it, greedy episodes succeed on 9-11 of 32 val questions,
depending on how the requests happen to be batched; with the example answering in sentences, 36 of 64 val
questions, 25 with bare values, on the same 64.)
The prompt is about 1,160 tokens; the tool schemas that the server renders take about 730 of them (370 before
cities, currencies and units became enums; the demo's steps took 50-90 s after it, as before).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any, Protocol

import openai
from openai.types.chat.chat_completion import Choice

from advantage import Trajectory
from advantage.trajectory import choice_to_message

from .env import TOOLS, Scenario, execute_tool
from .reward import RewardBreakdown, score

Message = dict[str, Any]
MAX_TOKENS = 96  # a call or a one-sentence answer fits in well under this

SYSTEM_PROMPT = "First call a tool. Then give its result inside <answer></answer>."
# Appended to each question: the tiny model copies the most recent tag it saw, and without this that is the
# example's "<tool_response>", so it writes "<tool_response>" where a call belongs.
CALL_HINT = "\nAnswer with <tool_call>."

# The example's instances lie outside the scenario space (other phrasings, an amount that is not a multiple
# of 5), so no scenario can be answered by copying it. The order matters: the model leans towards copying
# the first call, and with get_weather first the chance of a right call (teacher-forced, T=0.7) was half.
_EXAMPLE_CALLS: list[tuple[str, str, dict[str, Any]]] = [
    ("What do I have on 2025-01-15?", "get_events", {"date": "2025-01-15"}),
    # "What is X in Y?" as two of the three unit phrasings put it (the target last), abbreviation and name
    # mixed as no scenario does; greedy on the base model, 52 of 90 unit questions read the right way round
    # against 47 with "How many miles is 3 km?" (benchmarks/unit_direction.py).
    ("What is 3 km in miles?", "convert_units", {"value": 3, "from_unit": "km", "to_unit": "mi"}),
    (
        "Convert 12 USD to EUR.",
        "convert_currency",
        {"amount": 12, "from_currency": "USD", "to_currency": "EUR"},
    ),
    ("What's the weather like in Paris?", "get_weather", {"city": "Paris"}),
]


def _example() -> list[Message]:
    question = " ".join(q for q, _, _ in _EXAMPLE_CALLS)
    calls: list[Message] = []
    results: list[Message] = []
    sentences: list[str] = []
    for i, (_, name, args) in enumerate(_EXAMPLE_CALLS):
        arguments = json.dumps(args)
        calls.append(
            {
                "id": f"call_example_{i}",
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
        )
        result = execute_tool(name, arguments)
        results.append({"role": "tool", "tool_call_id": f"call_example_{i}", "content": result})
        sentences.append(_say(name, result))
    answer = " ".join(sentences)
    return [
        {"role": "user", "content": question + CALL_HINT},
        {"role": "assistant", "content": "", "tool_calls": calls},
        *results,
        {"role": "assistant", "content": f"<answer>{answer}</answer>"},
    ]


def _say(tool: str, result: str) -> str:
    """A tool result as the sentence the example's answer says it in ("3 km = 1.86 mi" -> "3 km is 1.86 mi.").

    Sentences, not the bare values: with "<answer>09:00 1.86 11.04 5</answer>" the model learnt to answer
    with lists of the example's numbers, and one seed spent 8 of its 12 steps there (train success 0.2).
    Greedy, on 64 val questions, the base model states the right value after a right call 90 % of the time
    with sentences against 68 % with bare values (sampled at T = 0.7 both are about 60 %)."""
    if tool == "get_events":
        return result.split(": ", 1)[1] + "."
    if tool == "get_weather":
        return result.replace(": ", " is ", 1).replace(", ", " and ", 1) + "."
    return result.replace(" = ", " is ", 1) + "."


EXAMPLE: list[Message] = _example()


class ChatModel(Protocol):
    """What a rollout needs from `advantage.Model` / `advantage.TrainableModel`."""

    def openai_client(self) -> openai.AsyncOpenAI: ...

    def get_inference_name(self) -> str: ...


def initial_messages(scenario: Scenario) -> list[Message]:
    """The prompt: system message, the worked example (copied, so no trajectory shares its dicts), question."""
    question = {"role": "user", "content": scenario.question + CALL_HINT}
    return [{"role": "system", "content": SYSTEM_PROMPT}, *copy.deepcopy(EXAMPLE), question]


@dataclass
class Episode:
    """One run of the agent: the conversation (the model's turns as the server's `Choice`s, with their
    sampled token ids), how it ended, and the ids of the chat completions it was made of."""

    items: list[Message | Choice]
    finish_reason: str  # "answered", "length" (the last reply cut off) or "max_turns"
    n_turns: int
    n_calls: int
    completion_ids: list[str] = field(default_factory=list)

    def messages(self) -> list[Message]:
        return [choice_to_message(m) if isinstance(m, Choice) else m for m in self.items]


async def run_episode(
    client: openai.AsyncOpenAI,
    model_name: str,
    scenario: Scenario,
    *,
    temperature: float = 1.0,
    max_turns: int = 3,
    force_first_call: bool = False,
    seed: int | None = None,
    metadata: dict[str, str] | None = None,
) -> Episode:
    """The agent, as an application runs it with the plain `openai` SDK: up to `max_turns` model turns;
    each tool call is executed and its result appended as a tool message.

    With `force_first_call`, the first turn is sent with `tool_choice="required"`: the server's grammar then
    only lets the model write one well-formed call of a known tool (which tool, and its arguments, are
    still the model's choice). The episode ends at the first reply without tool calls ("answered", or
    "length" when it was cut off) or after `max_turns` ("max_turns"). `seed` seeds the sampling of each turn
    (turn t uses seed + t), so a run's rollouts can be replayed. `metadata` goes with every request (the
    server records it with the traffic: an episode tag lets one feedback rate every turn)."""
    ep = Episode(items=list(initial_messages(scenario)), finish_reason="max_turns", n_turns=0, n_calls=0)
    extra = {"metadata": metadata} if metadata else {}
    for turn in range(max_turns):
        resp = await client.chat.completions.create(  # type: ignore[call-overload]  # plain dicts, as users write them
            model=model_name,
            messages=ep.messages(),
            tools=TOOLS,
            tool_choice="required" if force_first_call and turn == 0 else "auto",
            temperature=temperature,
            max_tokens=MAX_TOKENS,
            seed=None if seed is None else seed + turn,
            **extra,
        )
        choice = resp.choices[0]
        ep.items.append(choice)
        ep.completion_ids.append(resp.id)
        ep.n_turns += 1
        calls = choice_to_message(choice).get("tool_calls") or []
        if not calls:
            ep.finish_reason = "length" if choice.finish_reason == "length" else "answered"
            break
        for call in calls:
            fn = call.get("function") or {}
            result = execute_tool(str(fn.get("name", "")), str(fn.get("arguments") or "{}"))
            ep.items.append({"role": "tool", "tool_call_id": call.get("id"), "content": result})
            ep.n_calls += 1
    return ep


def grade(ep: Episode, scenario: Scenario) -> RewardBreakdown:
    """The task's reward for an episode (hidden from the model: the environment knows the answer)."""
    return score(ep.messages(), scenario, cut_off=ep.finish_reason == "length")


async def rollout(
    model: ChatModel,
    scenario: Scenario,
    *,
    temperature: float = 1.0,
    max_turns: int = 3,
    force_first_call: bool = False,
    seed: int | None = None,
) -> Trajectory:
    """One episode (`run_episode`) of `model` as a rewarded `Trajectory`."""
    ep = await run_episode(
        model.openai_client(),
        model.get_inference_name(),
        scenario,
        temperature=temperature,
        max_turns=max_turns,
        force_first_call=force_first_call,
        seed=seed,
    )
    g = grade(ep, scenario)
    traj = Trajectory(
        messages_and_choices=ep.items,
        tools=TOOLS,
        metadata={"scenario_id": scenario.id, "scenario": scenario.to_dict()},
        finish_reason=ep.finish_reason,
        reward=g.total,
    )
    traj.metrics = {
        "success": float(g.total >= 1.0 - 1e-9),
        "valid_call": float(g.valid_call),
        "right_tool": float(g.right_tool),
        "right_args": float(g.right_args),
        "answered": float(g.answered),
        "n_turns": float(ep.n_turns),
        "n_tool_calls": float(ep.n_calls),
    }
    return traj
