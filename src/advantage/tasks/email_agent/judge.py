"""An optional LLM judge for free-form answers that normalised matching cannot read ("a quarter to two").

Any OpenAI-compatible endpoint works, our own server included. The prompt is judge_prompt.txt; `_complete`
is the one network call, so tests replace it. An empty answer short-circuits to False; a verdict that does
not parse raises `JudgeError` (an outage is not the policy's failure, so it is never scored as wrong). The
judge's tokens are counted apart from the policy's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import openai

PROMPT = (Path(__file__).with_name("judge_prompt.txt")).read_text()


class JudgeError(RuntimeError):
    """The judge's reply had no readable verdict."""


class AnswerJudge:
    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None) -> None:
        self.model = model
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "unused", max_retries=2)
        self.prompt_tokens = 0
        self.completion_tokens = 0

    async def _complete(self, prompt: str) -> str:
        resp = await self.client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": prompt}], temperature=0.0, max_tokens=20
        )
        if resp.usage is not None:
            self.prompt_tokens += resp.usage.prompt_tokens
            self.completion_tokens += resp.usage.completion_tokens
        return resp.choices[0].message.content or ""

    async def is_correct(self, question: str, expected: str, answer: str) -> bool:
        if not answer.strip():
            return False
        reply = await self._complete(PROMPT.format(question=question, expected=expected, answer=answer))
        return parse_verdict(reply)


def parse_verdict(reply: str) -> bool:
    """The `correct` flag of a reply like '{"correct": true}'; raises JudgeError when there is none."""
    match = re.search(r"\{.*?\}", reply, re.DOTALL)
    try:
        verdict = json.loads(match.group(0)) if match else None
    except json.JSONDecodeError:
        verdict = None
    if not isinstance(verdict, dict) or not isinstance(verdict.get("correct"), bool):
        raise JudgeError(f'the judge\'s reply has no {{"correct": true|false}} verdict: {reply!r:.200}')
    return verdict["correct"]
