"""Enum values of a forced call chosen token by token, or scored whole (`TorchEngine(enum_lookahead=)`),
side by side on the base model: the demo's 144 weather questions (48 cities x 3 phrasings), greedy, first
call forced, as the demo asks them. Printed per side: calls to the wrong tool, right tool with the wrong
city, and the seconds the 144 requests took.

    .venv/bin/python benchmarks/enum_choice.py [--lookahead 4] [--json out.json]

Both sides use the tokenizer's own tokens for enum values (`grammar.grammar_for_tool_choice`); `--chars`
adds a third side with llguidance's character-by-character enums (the grammar before canonical tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import advantage as adv  # noqa: E402
from advantage.engine import grammar  # noqa: E402
from advantage.tasks.tool_use.env import CITIES, TEMPLATES, TOOLS, Scenario  # noqa: E402
from advantage.tasks.tool_use.rollout import initial_messages  # noqa: E402


async def side(root: Path, label: str, lookahead: int) -> dict[str, Any]:
    backend = adv.LocalBackend(root / label, progress=False, enum_lookahead=lookahead)
    model = adv.TrainableModel("enum", project="bench", base_model="smollm2-135m-instruct")
    await model.register(backend)
    client = model.openai_client()

    async def one(city: str, question: str) -> tuple[str, str, str | None, str | None]:
        scenario = Scenario("x", question, "get_weather", {"city": city})
        resp = await client.chat.completions.create(  # type: ignore[call-overload]
            model=model.get_inference_name(), messages=initial_messages(scenario), tools=TOOLS,
            tool_choice="required", temperature=0.0, max_tokens=96,
        )  # fmt: skip
        calls = resp.choices[0].message.tool_calls or []
        if not calls:
            return city, question, None, None
        args = json.loads(calls[0].function.arguments)
        return city, question, calls[0].function.name, args.get("city")

    questions = [(c, t.format(city=c)) for c in CITIES for t in TEMPLATES["get_weather"]]
    t0 = time.perf_counter()
    got = await asyncio.gather(*[one(c, q) for c, q in questions])
    seconds = time.perf_counter() - t0
    await backend.close()
    wrong_tool = [g for g in got if g[2] != "get_weather"]
    wrong_city = [g for g in got if g[2] == "get_weather" and g[3] != g[0]]
    print(
        f"{label:>16}: wrong tool {len(wrong_tool)}/{len(got)}, wrong city {len(wrong_city)}/{len(got)}, "
        f"{seconds:.1f} s",
        flush=True,
    )
    for _, question, _, called in wrong_city:
        print(f"{'':>18}{question!r} -> {called}")
    return {"wrong_tool": len(wrong_tool), "wrong_city": len(wrong_city), "seconds": seconds,
            "wrong_cities": [(q, c) for _, q, _, c in wrong_city]}  # fmt: skip


async def main(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with TemporaryDirectory() as tmp:
        out["scored whole"] = await side(Path(tmp), "scored whole", args.lookahead)
        out["token by token"] = await side(Path(tmp), "token by token", 0)
        if args.chars:  # no canonical tokens: GrammarCompiler without offsets spells enums by character
            grammar.GrammarCompiler.token_spans = lambda self, text: []  # type: ignore[method-assign]
            out["characters"] = await side(Path(tmp), "characters", 0)
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lookahead", type=int, default=4, help="candidates scored whole per enum value")
    p.add_argument("--chars", action="store_true", help="also llguidance's character-by-character enums")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    result = asyncio.run(main(a))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
