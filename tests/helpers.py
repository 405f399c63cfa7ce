"""Shared test helpers (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import advantage as adv

PROMPT = [{"role": "user", "content": "Say something."}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


async def toy_rollout(model: adv.TrainableModel) -> adv.Trajectory:
    """A one-turn rollout with an arbitrary but varied reward, so every group carries signal."""
    resp = await model.openai_client().chat.completions.create(
        model=model.get_inference_name(), messages=PROMPT, max_tokens=6, temperature=1.0
    )
    choice = resp.choices[0]
    ids = choice.model_extra["token_ids"]
    return adv.Trajectory([*PROMPT, choice], reward=float(sum(ids) % 7) / 7)
