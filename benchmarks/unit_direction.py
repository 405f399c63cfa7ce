"""Which way round the model reads a unit conversion: the demo's convert_units questions (10 unit pairs x 3
phrasings x 3 values), first call forced, on the base model, for each argument order of the tool's schema
side by side. Printed per side: greedy calls with the direction right / reversed / another unit / another
tool, and at T = 0.7 with 4 samples per question the share right, plus the groups with a reward signal
(some but not all of the 4 right: what GRPO learns from).

    .venv/bin/python benchmarks/unit_direction.py

Sides: the schema's argument order ("from first": value, from_unit, to_unit, as before session 31 and again
since session 33; "to first": value, to_unit, from_unit, the target unit before the given one, as in sessions
31-32; the worked example's call follows it) and the worked example's unit question. This measures the base
model only: the trained policy reads units right more often with the source first (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import time
from collections import Counter
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import advantage as adv  # noqa: E402
from advantage.tasks.tool_use import rollout as ro  # noqa: E402
from advantage.tasks.tool_use.env import TEMPLATES, TOOLS, UNIT_NAMES, UNIT_PAIRS, Scenario  # noqa: E402

FROM_FIRST, TO_FIRST = ("value", "from_unit", "to_unit"), ("value", "to_unit", "from_unit")
NOW = "What is 3 km in miles?"  # the worked example's unit question (rollout._EXAMPLE_CALLS)
SIDES = {  # label: (argument order, the worked example's unit question)
    "from first, 'How many miles is 3 km?' (session 30)": (FROM_FIRST, "How many miles is 3 km?"),
    "to first, 'How many miles is 3 km?'": (TO_FIRST, "How many miles is 3 km?"),
    "to first, 'What is 3 km in miles?' (sessions 31-32)": (TO_FIRST, NOW),
    "from first, 'What is 3 km in miles?' (now)": (FROM_FIRST, NOW),
}


def with_order(keys: tuple[str, ...], question: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The tools and the worked example with convert_units' arguments in `keys` order, and `question` as
    the example's unit question."""
    tools = copy.deepcopy(TOOLS)
    for t in tools:
        if t["function"]["name"] == "convert_units":
            p = t["function"]["parameters"]
            p["properties"] = {k: p["properties"][k] for k in keys}
            p["required"] = list(keys)
    example = copy.deepcopy(ro.EXAMPLE)
    assert NOW in example[0]["content"]
    example[0]["content"] = example[0]["content"].replace(NOW, question)
    for call in example[1]["tool_calls"]:
        if call["function"]["name"] == "convert_units":
            args = json.loads(call["function"]["arguments"])
            call["function"]["arguments"] = json.dumps({k: args[k] for k in keys})
    return tools, example


def questions() -> list[tuple[str, str, str]]:
    return [
        (
            src,
            dst,
            t.format(value=v, from_unit=src, to_unit=dst, from_name=UNIT_NAMES[src], to_name=UNIT_NAMES[dst]),
        )
        for src, dst in UNIT_PAIRS
        for t in TEMPLATES["convert_units"]
        for v in (7, 42, 130)
    ]


async def side(root: Path, label: str, keys: tuple[str, ...], question: str) -> dict[str, Any]:
    tools, example = with_order(keys, question)
    backend = adv.LocalBackend(root / str(len(list(root.iterdir()))), progress=False)
    model = adv.TrainableModel("units", project="bench", base_model="smollm2-135m-instruct")
    await model.register(backend)
    client = model.openai_client()

    async def one(src: str, dst: str, question: str, temperature: float, n: int) -> list[str]:
        messages = ro.initial_messages(Scenario("x", question, "convert_units", {}))
        messages[1:-1] = copy.deepcopy(example)
        resp = await client.chat.completions.create(  # type: ignore[call-overload]
            model=model.get_inference_name(), messages=messages, tools=tools, tool_choice="required",
            temperature=temperature, max_tokens=96, n=n, seed=1,
        )  # fmt: skip
        out = []
        for c in resp.choices:
            calls = c.message.tool_calls or []
            if not calls or calls[0].function.name != "convert_units":
                out.append("other tool")
                continue
            a = json.loads(calls[0].function.arguments)
            got = (a.get("from_unit"), a.get("to_unit"))
            out.append("right" if got == (src, dst) else "reversed" if got == (dst, src) else "other unit")
        return out

    qs = questions()
    t0 = time.perf_counter()
    greedy = Counter(x[0] for x in await asyncio.gather(*[one(s, d, q, 0.0, 1) for s, d, q in qs]))
    sampled = await asyncio.gather(*[one(s, d, q, 0.7, 4) for s, d, q in qs])
    seconds = time.perf_counter() - t0
    await backend.close()
    flat = Counter(x for g in sampled for x in g)
    signal = sum(0 < g.count("right") < len(g) for g in sampled)
    print(
        f"{label}: greedy right {greedy['right']}/{len(qs)}, reversed {greedy['reversed']}, other unit "
        f"{greedy['other unit']}, other tool {greedy['other tool']} | T=0.7 x4: right "
        f"{flat['right'] / sum(flat.values()):.0%}, groups with signal {signal}/{len(qs)} ({seconds:.0f} s)",
        flush=True,
    )
    return {"greedy": dict(greedy), "sampled": dict(flat), "groups_with_signal": signal, "questions": len(qs)}


async def main() -> dict[str, Any]:
    with TemporaryDirectory() as tmp:
        return {label: await side(Path(tmp), label, *how) for label, how in SIDES.items()}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    result = asyncio.run(main())
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
