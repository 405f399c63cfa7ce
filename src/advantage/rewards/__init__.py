"""Rewards that need no hand-written reward function: RULER, a relative LLM judge."""

from advantage.rewards.ruler import (
    DEFAULT_RUBRIC,
    JudgeUsage,
    JudgeVerdict,
    RulerError,
    RulerJudge,
    ruler,
    ruler_score_group,
)

__all__ = [
    "DEFAULT_RUBRIC",
    "JudgeUsage",
    "JudgeVerdict",
    "RulerError",
    "RulerJudge",
    "ruler",
    "ruler_score_group",
]
