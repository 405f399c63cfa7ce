"""The tool-use task's world: four tools, their deterministic (fake but consistent) data, and the scenarios.

Every question is templated and carries its tool's arguments verbatim ("Convert 120 USD to EUR." ->
convert_currency(amount=120, from_currency="USD", to_currency="EUR")), so a 135M model can learn the task.

Splits: every possible question belongs to exactly one split, chosen by a hash of its text (about 20% go to
"val"). Both splits draw from the same templates, cities, currencies, units and dates, so val is the same
distribution as train; `seed` only picks which instances of a split you get.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Split = Literal["train", "val"]
VAL_FRACTION = 0.2


def _fn(name: str, params: dict[str, dict[str, Any]]) -> dict[str, Any]:
    schema = {"type": "object", "properties": params, "required": list(params), "additionalProperties": False}
    return {"type": "function", "function": {"name": name, "parameters": schema}}


# ------------------------------------------------------------------------------------------------ the world

CITIES = [
    "Paris", "London", "Tokyo", "Lisbon", "Madrid", "Rome", "Berlin", "Vienna", "Prague", "Oslo", "Dublin",
    "Cairo", "Lima", "Sydney", "Toronto", "Chicago", "Boston", "Seattle", "Denver", "Miami", "Athens",
    "Warsaw", "Budapest", "Helsinki", "Stockholm", "Amsterdam", "Brussels", "Zurich", "Geneva", "Munich",
    "Milan", "Naples", "Seoul", "Beijing", "Shanghai", "Mumbai", "Delhi", "Bangkok", "Istanbul", "Nairobi",
    "Lagos", "Santiago", "Bogota", "Havana", "Montreal", "Vancouver", "Austin", "Phoenix",
]  # fmt: skip
CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "foggy", "snowy"]

# Units of currency per 1 USD (a frozen, made-up day of the market).
USD_RATES = {
    "USD": 1.0, "EUR": 0.92, "GBP": 0.79, "JPY": 151.5, "CHF": 0.88,
    "CAD": 1.36, "AUD": 1.52, "INR": 83.2, "CNY": 7.23, "MXN": 16.9,
}  # fmt: skip

# Canonical unit -> (quantity, size in that quantity's base unit).
UNITS = {
    "km": ("length", 1000.0), "m": ("length", 1.0), "cm": ("length", 0.01), "mi": ("length", 1609.344),
    "ft": ("length", 0.3048), "in": ("length", 0.0254), "kg": ("mass", 1.0), "lb": ("mass", 0.45359237),
    "l": ("volume", 1.0), "gal": ("volume", 3.785411784),
}  # fmt: skip
UNIT_ALIASES = {
    "kilometer": "km", "kilometers": "km", "kilometre": "km", "kilometres": "km",
    "meter": "m", "meters": "m", "metre": "m", "metres": "m",
    "centimeter": "cm", "centimeters": "cm", "centimetre": "cm", "centimetres": "cm",
    "mile": "mi", "miles": "mi", "foot": "ft", "feet": "ft", "inch": "in", "inches": "in",
    "kilogram": "kg", "kilograms": "kg", "kgs": "kg", "pound": "lb", "pounds": "lb", "lbs": "lb",
    "liter": "l", "liters": "l", "litre": "l", "litres": "l", "gallon": "gal", "gallons": "gal",
}  # fmt: skip
UNIT_PAIRS = [("km", "mi"), ("mi", "km"), ("m", "ft"), ("ft", "m"), ("cm", "in"), ("in", "cm"),
              ("kg", "lb"), ("lb", "kg"), ("l", "gal"), ("gal", "l")]  # fmt: skip
UNIT_NAMES = {"km": "kilometers", "mi": "miles", "m": "meters", "ft": "feet", "cm": "centimeters",
              "in": "inches", "kg": "kilograms", "lb": "pounds", "l": "liters", "gal": "gallons"}  # fmt: skip

EVENTS = ["Dentist", "Team meeting", "Lunch with Sam", "Yoga class", "Project review", "Call with Mom",
          "Haircut", "Doctor visit", "Book club", "Flight to Oslo"]  # fmt: skip
YEAR = 2025

# The tools' schemas. Bare on purpose (no descriptions): they go into every prompt of a 135M model, where each
# token costs time and attention. Strict (every argument required, no others), as OpenAI's strict mode has
# it: a forced call is then decoded under exactly these keys. Cities, currencies and units are enums, as a
# real API's would be: the grammar then only admits names the tool knows, and what is left to learn is which
# tool, which of those names, which direction and which number. With free strings the policy's commonest
# wrong calls were made-up names ("MILENY", "CZN", "LBL", "Södertälle") that no tool result can answer.
_NUMBER = {"type": "number"}
_CITY = {"type": "string", "enum": CITIES}
_CURRENCY = {"type": "string", "enum": list(USD_RATES)}
_UNIT = {"type": "string", "enum": list(UNITS)}
TOOLS: list[dict[str, Any]] = [
    _fn("get_weather", {"city": _CITY}),
    _fn("convert_currency", {"amount": _NUMBER, "from_currency": _CURRENCY, "to_currency": _CURRENCY}),
    # The unit given comes before the unit asked for. The base model reads the units the right way round more
    # often with the target first (greedy, 90 questions: 47 against 36), but the trained policy fills the first
    # unit slot with the unit the question names first, which is the source in two of the three phrasings:
    # with the source first, the demo's unit rollouts stop reading units backwards (BENCHMARKS.md).
    _fn("convert_units", {"value": _NUMBER, "from_unit": _UNIT, "to_unit": _UNIT}),
    _fn("get_events", {"date": {"type": "string", "description": "YYYY-MM-DD"}}),
]
TOOL_NAMES = [t["function"]["name"] for t in TOOLS]


def weather(city: str) -> tuple[int, str]:
    """(temperature in °C, condition) for a known city; the same every time."""
    rng = random.Random(f"weather:{city}")
    return rng.randint(5, 34), rng.choice(CONDITIONS)


def event_on(date: dt.date) -> tuple[str, str]:
    """(event title, "HH:MM") on a date of the calendar year; every day holds exactly one event."""
    rng = random.Random(f"calendar:{date.isoformat()}")
    return rng.choice(EVENTS), f"{rng.randint(8, 18):02d}:{rng.choice([0, 15, 30, 45]):02d}"


def _fmt_amount(x: float) -> str:
    return f"{x:.2f}"


def _fmt_number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


# ------------------------------------------------------------------------------------------- the tools


class ToolError(ValueError):
    """Bad arguments for a tool; `execute_tool` returns the message to the model instead of raising."""


def canonical_arguments(name: str, args: dict[str, Any]) -> dict[str, Any]:
    """Arguments in one canonical form (known city spelling, upper-case codes, canonical units, floats).

    Two calls mean the same thing exactly when their canonical arguments are equal. Raises `ToolError`."""
    if name == "get_weather":
        city = str(_arg(args, "city")).strip()
        match = next((c for c in CITIES if c.lower() == city.lower()), None)
        if match is None:
            raise ToolError(f"no weather data for city {city!r}")
        return {"city": match}
    if name == "convert_currency":
        codes = [str(_arg(args, k)).strip().upper() for k in ("from_currency", "to_currency")]
        for code in codes:
            if code not in USD_RATES:
                raise ToolError(f"unknown currency {code!r}; use one of {', '.join(USD_RATES)}")
        return {"amount": _number(args, "amount"), "from_currency": codes[0], "to_currency": codes[1]}
    if name == "convert_units":
        units = [_unit(str(_arg(args, k))) for k in ("from_unit", "to_unit")]
        if UNITS[units[0]][0] != UNITS[units[1]][0]:
            raise ToolError(f"cannot convert {units[0]} to {units[1]}")
        return {"value": _number(args, "value"), "from_unit": units[0], "to_unit": units[1]}
    if name == "get_events":
        text = str(_arg(args, "date")).strip()
        try:
            date = dt.date.fromisoformat(text)
        except ValueError:
            raise ToolError(f"date must be YYYY-MM-DD, got {text!r}") from None
        if date.year != YEAR:
            raise ToolError(f"the calendar only covers {YEAR}")
        return {"date": date.isoformat()}
    raise ToolError(f"unknown tool {name!r}; available tools: {', '.join(TOOL_NAMES)}")


def _arg(args: dict[str, Any], key: str) -> Any:
    if key not in args:
        raise ToolError(f"missing argument {key!r}")
    return args[key]


def _number(args: dict[str, Any], key: str) -> float:
    value = _arg(args, key)
    try:
        x = float(str(value).replace(",", "")) if not isinstance(value, bool) else math.nan
    except ValueError:
        x = math.nan
    if not math.isfinite(x):
        raise ToolError(f"{key} must be a number, got {value!r}")
    return x


def _unit(text: str) -> str:
    key = text.strip().lower().rstrip(".")
    unit = key if key in UNITS else UNIT_ALIASES.get(key)
    if unit is None:
        raise ToolError(f"unknown unit {text!r}; use one of {', '.join(UNITS)}")
    return unit


def run_tool(name: str, args: dict[str, Any]) -> str:
    """The tool's answer for valid arguments. Raises `ToolError` for bad ones."""
    a = canonical_arguments(name, args)
    if name == "get_weather":
        temp, cond = weather(a["city"])
        return f"{a['city']}: {temp}°C, {cond}"
    if name == "convert_currency":
        out = a["amount"] * USD_RATES[a["to_currency"]] / USD_RATES[a["from_currency"]]
        return f"{_fmt_number(a['amount'])} {a['from_currency']} = {_fmt_amount(out)} {a['to_currency']}"
    if name == "convert_units":
        out = a["value"] * UNITS[a["from_unit"]][1] / UNITS[a["to_unit"]][1]
        return f"{_fmt_number(a['value'])} {a['from_unit']} = {_fmt_amount(out)} {a['to_unit']}"
    title, time = event_on(dt.date.fromisoformat(a["date"]))
    return f"{a['date']}: {title} at {time}"


def execute_tool(name: str, arguments_json: str) -> str:
    """Run a tool call as the model wrote it. Never raises: a bad call gets an "Error: ..." string back."""
    try:
        args = json.loads(arguments_json or "{}")
    except (json.JSONDecodeError, TypeError):
        return f"Error: arguments are not valid JSON: {arguments_json!r:.80}"
    if not isinstance(args, dict):
        return f"Error: arguments must be a JSON object, got {arguments_json!r:.80}"
    try:
        return run_tool(name, args)
    except ToolError as e:
        return f"Error: {e}"


# ------------------------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    id: str
    question: str
    tool: str  # the tool that answers it
    arguments: dict[str, Any]  # canonical arguments of the right call
    answer_facts: tuple[str, ...] = field(default=())  # what a correct final answer must contain

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "answer_facts": list(self.answer_facts)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scenario:
        return cls(d["id"], d["question"], d["tool"], dict(d["arguments"]), tuple(d["answer_facts"]))


TEMPLATES = {
    "get_weather": ["What's the weather in {city}?", "What is the temperature in {city}?",
                    "How warm is it in {city} today?"],
    "convert_currency": ["Convert {amount} {from_currency} to {to_currency}.",
                         "How much is {amount} {from_currency} in {to_currency}?",
                         "What is {amount} {from_currency} in {to_currency}?"],
    "convert_units": ["Convert {value} {from_unit} to {to_unit}.",
                      "How many {to_name} is {value} {from_name}?",
                      "What is {value} {from_name} in {to_name}?"],
    "get_events": ["What's on my calendar on {date}?", "Do I have anything scheduled on {date}?",
                   "What is my appointment on {date}?"],
}  # fmt: skip


def answer_facts(tool: str, arguments: dict[str, Any]) -> tuple[str, ...]:
    """The key value of the right tool's result: a temperature, an amount, a converted value, a time."""
    result = run_tool(tool, arguments)
    if tool == "get_weather":
        return (result.split(": ")[1].split("°")[0],)
    if tool == "get_events":
        return (result.rsplit(" at ", 1)[1],)
    return (result.split(" = ")[1].split(" ")[0],)


def _draw(rng: random.Random, tool: str) -> tuple[str, dict[str, Any]]:
    """One random (question, arguments) for a tool, from the whole space (both splits)."""
    template = rng.choice(TEMPLATES[tool])
    if tool == "get_weather":
        args: dict[str, Any] = {"city": rng.choice(CITIES)}
        return template.format(**args), args
    if tool == "convert_currency":
        src, dst = rng.sample(sorted(USD_RATES), 2)
        args = {
            "amount": rng.choice([5, 10, 20, 25, 50]) * rng.randint(1, 20),
            "from_currency": src,
            "to_currency": dst,
        }
        return template.format(**args), args
    if tool == "convert_units":
        src, dst = rng.choice(UNIT_PAIRS)
        args = {"value": rng.randint(1, 250), "from_unit": src, "to_unit": dst}
        names = {"from_name": UNIT_NAMES[src], "to_name": UNIT_NAMES[dst]}
        return template.format(**args, **names), args
    date = dt.date(YEAR, 1, 1) + dt.timedelta(days=rng.randrange(365))
    args = {"date": date.isoformat()}
    return template.format(**args), args


def equal_mix(n: int) -> dict[str, int]:
    """`n` scenarios in equal shares of the tools; the first tools take the remainder (n = 6: 2, 2, 1, 1)."""
    return {t: n // len(TOOL_NAMES) + (i < n % len(TOOL_NAMES)) for i, t in enumerate(TOOL_NAMES)}


def _slots(n: int, mix: Mapping[str, int] | None) -> list[str]:
    """The tool of each of `n` scenarios: round-robin over the tools while each has some of its count left
    (with equal counts, or none given, that is plain turn-taking)."""
    if mix is None:
        mix = equal_mix(n)
    unknown = set(mix) - set(TOOL_NAMES)
    if unknown:
        raise ValueError(f"mix names unknown tools {sorted(unknown)}; the tools are {TOOL_NAMES}")
    if any(c < 0 for c in mix.values()) or sum(mix.values()) != n:
        raise ValueError(f"mix must hold counts >= 0 that add up to n={n}, got {dict(mix)}")
    left = {t: mix.get(t, 0) for t in TOOL_NAMES}
    slots: list[str] = []
    while len(slots) < n:
        for t in TOOL_NAMES:
            if left[t]:
                slots.append(t)
                left[t] -= 1
    return slots


def split_of(question: str) -> Split:
    """The split a question belongs to, fixed by its text (so no instance is in both)."""
    h = int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big")
    return "val" if h / 2**64 < VAL_FRACTION else "train"


def make_scenarios(
    n: int, seed: int = 0, split: Split = "train", mix: Mapping[str, int] | None = None
) -> list[Scenario]:
    """`n` scenarios of `split`; the same (n, seed, split, mix) gives the same list.

    `mix` says how many of the `n` are questions for each tool (e.g. `TaskMix.counts(n)`); by default the
    tools take turns, so the shares are equal. Repeats within a list are avoided while the split has unused
    instances of a tool."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    rng = random.Random(f"tool_use:{split}:{seed}")
    seen: set[str] = set()
    out: list[Scenario] = []
    for tool in _slots(n, mix):
        for _attempt in range(200):
            question, args = _draw(rng, tool)
            if split_of(question) == split and question not in seen:
                break
        else:  # this split's instances of the tool are used up: accept a repeat
            while split_of(question) != split:
                question, args = _draw(rng, tool)
        seen.add(question)
        canon = canonical_arguments(tool, args)
        sid = f"{tool}-{hashlib.sha256(question.encode()).hexdigest()[:8]}"
        out.append(Scenario(sid, question, tool, canon, answer_facts(tool, canon)))
    rng.shuffle(out)
    return out
