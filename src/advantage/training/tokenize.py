"""Turn a `Trajectory` into one token sequence with a mask over the tokens the policy sampled.

Token-in / token-out: each Choice contributes the exact ids the backend sampled (`model_extra["token_ids"]`)
and their recorded logprobs; its text is never re-tokenized, because re-tokenizing a model's own output can
give different ids than it sampled, and the ratio exp(logp_new - logp_old) would then compare different
tokens. Only the context (plain message dicts, tool results, the template's turn markers) is tokenized.

One sequence per trajectory (`tokenize_trajectory`), when the model family's chat format is concatenative
(each render of a longer conversation only appends text, as in ChatML, Llama 3, Gemma 3): it is built left to
right. At the k-th item, when it is a Choice, the context text is `render_prompt(messages[:k],
add_generation_prompt=True)`; only its new part since the text already emitted is tokenized. After a Choice,
the template's end-of-turn suffix (e.g. "<|im_end|>\\n") is appended as context, minus the end-of-turn token
when the sampled ids already end with it. Context after the last Choice is dropped: there is nothing to
train on there.

One sequence per Choice (`tokenize_turns`), when the format rewrites earlier turns (Qwen3 drops the
`<think>` blocks of turns before the last user message): a single sequence would then train later turns on
a context the model never saw. Each Choice becomes its own sequence: the exact prompt it was sampled from
(the backend's `prompt_token_ids`, or the render of the messages before it), then its sampled ids. This is
how tinker-cookbook's renderers and ART's `additional_histories` train such models. `tokenize_for_training`
picks between the two, and falls back to one per Choice when a template we do not know proves not to be
concatenative.

Tokens that a grammar forced (`model_extra["forced_token_indices"]`: a forced tool call's JSON keys and
punctuation) stay in the sequence as context but out of the mask. The policy that acted there had one token
to pick, so its logprob is 0 whatever the weights; training them with the episode's advantage would only
move the unconstrained model's view of the JSON syntax, up or down with the reward of values chosen
elsewhere, and that spills over into the turns that are not constrained.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from openai.types.chat.chat_completion import Choice

from advantage.engine.chat import render_prompt
from advantage.engine.renderers import renderer_for
from advantage.trajectory import Message, Trajectory

NO_CHOICE = (
    "This trajectory has no Choice, so there is nothing to train on; keep at least one completion returned by "
    "the backend in messages_and_choices."
)
CHOICE_FIRST = "messages_and_choices starts with a Choice; put the messages it was sampled from before it."

# Stands in for an assistant turn's content, to read off the template's end-of-turn suffix.
_SENTINEL = "\u2063ADVANTAGE-SENTINEL\u2063"


class HistoryRewrittenError(ValueError):
    """The chat template renders an earlier turn differently once later turns follow it."""


@dataclass
class TokenizedTrajectory:
    input_ids: list[int]
    assistant_mask: list[int]  # 1 exactly on the tokens sampled in Choices, except those a grammar forced
    old_logprobs: list[float]  # the sampler's logprob where the mask is 1, else 0.0
    choice_spans: list[tuple[int, int]]  # [start, end) of each Choice's sampled ids in input_ids
    truncated: bool = False


def tokenize_trajectory(
    tokenizer: Any,
    trajectory: Trajectory,
    max_len: int,
    on_overflow: Literal["error", "truncate"] = "error",
) -> TokenizedTrajectory:
    """Token ids, trainable mask and sampler logprobs for `trajectory` (rules in the module docstring).

    Raises ValueError when the trajectory has no Choice, when a Choice lacks the backend's token ids, or
    when the sequence exceeds `max_len` and `on_overflow` is "error"."""
    _check_overflow_mode(on_overflow)
    items = trajectory.messages_and_choices
    last = max((k for k, m in enumerate(items) if isinstance(m, Choice)), default=-1)
    if last < 0:
        raise ValueError(NO_CHOICE)
    messages: list[Message] = trajectory.messages()
    eos_id = tokenizer.eos_token_id
    stops = set(renderer_for(tokenizer).stop_tokens)
    if eos_id is not None:
        stops.add(tokenizer.convert_ids_to_tokens(eos_id))

    ids: list[int] = []
    mask: list[int] = []
    logprobs: list[float] = []
    spans: list[tuple[int, int]] = []
    emitted = ""  # the rendered text that `ids` stands for so far

    def render(msgs: list[Message], gen: bool) -> str:
        return render_prompt(tokenizer, msgs, tools=trajectory.tools, add_generation_prompt=gen)

    def emit_context(text: str) -> None:
        new = tokenizer.encode(text, add_special_tokens=False) if text else []
        ids.extend(new)
        mask.extend([0] * len(new))
        logprobs.extend([0.0] * len(new))

    for k, item in enumerate(items[: last + 1]):
        if not isinstance(item, Choice):
            continue
        sampled, sampled_lp, forced = _sampled(item, k)
        if k == 0:
            raise ValueError(CHOICE_FIRST)
        prompt = render(messages[:k], gen=True)
        emit_context(_delta(emitted, prompt, k))

        spans.append((len(ids), len(ids) + len(sampled)))
        ids.extend(sampled)
        mask.extend(0 if i in forced else 1 for i in range(len(sampled)))
        logprobs.extend(sampled_lp)

        suffix = _turn_suffix(render, messages[:k], prompt)
        end = tokenizer.convert_ids_to_tokens(sampled[-1]) if sampled else None
        if end in stops and suffix.startswith(end):  # the model ended its turn itself
            suffix = suffix[len(end) :]
        emit_context(suffix)
        emitted = render(messages[: k + 1], gen=False)
        _delta(prompt, emitted, k)  # the assistant turn must extend its own prompt

    return _fit(TokenizedTrajectory(ids, mask, logprobs, spans), max_len, on_overflow)


def tokenize_turns(
    tokenizer: Any,
    trajectory: Trajectory,
    max_len: int,
    on_overflow: Literal["error", "truncate"] = "error",
) -> list[TokenizedTrajectory]:
    """One sequence per Choice: the prompt that Choice was sampled from, then its sampled ids (trainable).

    The prompt is the Choice's `prompt_token_ids` (what the backend fed the model) when it has them, else
    the render of the messages before it. Raises as `tokenize_trajectory` does, per sequence."""
    _check_overflow_mode(on_overflow)
    messages: list[Message] = trajectory.messages()
    out: list[TokenizedTrajectory] = []
    for k, item in enumerate(trajectory.messages_and_choices):
        if not isinstance(item, Choice):
            continue
        if k == 0:
            raise ValueError(CHOICE_FIRST)
        sampled, sampled_lp, forced = _sampled(item, k)
        context = _prompt_ids(item, k)
        if context is None:
            prompt = render_prompt(
                tokenizer, messages[:k], tools=trajectory.tools, add_generation_prompt=True
            )
            context = tokenizer.encode(prompt, add_special_tokens=False)
        ids = context + sampled
        mask = [0] * len(context) + [0 if i in forced else 1 for i in range(len(sampled))]
        logprobs = [0.0] * len(context) + sampled_lp
        out.append(
            _fit(TokenizedTrajectory(ids, mask, logprobs, [(len(context), len(ids))]), max_len, on_overflow)
        )
    if not out:
        raise ValueError(NO_CHOICE)
    return out


def tokenize_for_training(
    tokenizer: Any,
    trajectory: Trajectory,
    max_len: int,
    on_overflow: Literal["error", "truncate"] = "error",
) -> list[TokenizedTrajectory]:
    """The trajectory's training sequences: one when the chat format is concatenative, else one per Choice."""
    if not renderer_for(tokenizer).concatenative:
        return tokenize_turns(tokenizer, trajectory, max_len, on_overflow)
    try:
        return [tokenize_trajectory(tokenizer, trajectory, max_len, on_overflow)]
    except HistoryRewrittenError:  # a template we do not know, which rewrites history after all
        return tokenize_turns(tokenizer, trajectory, max_len, on_overflow)


def _check_overflow_mode(on_overflow: str) -> None:
    if on_overflow not in ("error", "truncate"):
        raise ValueError(f"on_overflow must be 'error' or 'truncate', got {on_overflow!r}.")


def _fit(tok: TokenizedTrajectory, max_len: int, on_overflow: str) -> TokenizedTrajectory:
    """`tok` if it fits in `max_len` tokens; else cut to it (on_overflow "truncate") or raise ("error")."""
    n = len(tok.input_ids)
    if n <= max_len:
        return tok
    if on_overflow == "error":
        raise ValueError(
            f"Trajectory is {n} tokens, over the limit of {max_len}. Raise max_seq_len, or "
            "shorten the rollout (fewer turns, shorter tool results, lower max_tokens); or pass "
            "on_overflow='truncate' to cut it."
        )
    spans = [(s, min(e, max_len)) for s, e in tok.choice_spans if s < max_len]
    return TokenizedTrajectory(
        tok.input_ids[:max_len], tok.assistant_mask[:max_len], tok.old_logprobs[:max_len], spans, True
    )


def _prompt_ids(choice: Choice, k: int) -> list[int] | None:
    """The prompt ids the backend recorded for a Choice, checked; None when it recorded none."""
    ids = (choice.model_extra or {}).get("prompt_token_ids")
    if ids is None:
        return None
    if not isinstance(ids, list) or not all(isinstance(t, int) and t >= 0 for t in ids):
        raise ValueError(f"messages_and_choices[{k}] has prompt_token_ids that are not a list of token ids.")
    return list(ids)


def _sampled(choice: Choice, k: int) -> tuple[list[int], list[float], set[int]]:
    """The backend's sampled ids, their logprobs and the indices a grammar forced, for a Choice, checked."""
    extra = choice.model_extra or {}
    token_ids, token_lps = extra.get("token_ids"), extra.get("token_logprobs")
    if token_ids is None or token_lps is None:
        raise ValueError(
            f"messages_and_choices[{k}] is a Choice without token_ids/token_logprobs: this Choice did not "
            "come from an advantage backend; pass it as a plain dict to use it as context."
        )
    if len(token_ids) != len(token_lps):
        raise ValueError(
            f"messages_and_choices[{k}] has {len(token_ids)} token_ids but {len(token_lps)} token_logprobs; "
            "they must be the same length."
        )
    forced = {int(i) for i in extra.get("forced_token_indices") or []}
    if any(not 0 <= i < len(token_ids) for i in forced):
        raise ValueError(
            f"messages_and_choices[{k}] has forced_token_indices outside its {len(token_ids)} token_ids."
        )
    return [int(t) for t in token_ids], [float(x) for x in token_lps], forced


def _delta(emitted: str, rendered: str, k: int) -> str:
    """The part of `rendered` after `emitted`, which must be its prefix (the template is concatenative)."""
    if not rendered.startswith(emitted):
        raise HistoryRewrittenError(
            f"The chat template re-renders earlier turns differently at messages_and_choices[{k}], so the "
            "conversation cannot be built incrementally from sampled tokens. Use a template where each turn "
            "only appends text (e.g. ChatML)."
        )
    return rendered[len(emitted) :]


def _turn_suffix(render: Callable[[list[Message], bool], str], context: list[Message], prompt: str) -> str:
    """The text the template puts after an assistant turn's content (e.g. "<|im_end|>\\n")."""
    probe = render([*context, {"role": "assistant", "content": _SENTINEL}], False)
    head, sep, tail = probe.partition(_SENTINEL)
    if not sep or not head.startswith(prompt):
        raise ValueError("Cannot find the end-of-turn text of the chat template's assistant turns.")
    return tail


def tokenize_for_sft(
    tokenizer: Any,
    trajectory: Trajectory,
    max_len: int,
    on_overflow: Literal["error", "truncate"] = "error",
) -> TokenizedTrajectory:
    """Token ids and a mask over every assistant turn's rendered text, for supervised fine-tuning.

    Unlike `tokenize_trajectory`, assistant turns are trained on as text (plain dicts and Choices alike,
    from any model: a teacher's output has no token ids of ours), including the template's end-of-turn
    marker, so the model learns to stop. Context is rendered with the chat template, as there. An assistant
    message with `"weight": 0` (OpenAI's fine-tuning format) is context only, not trained on."""
    messages: list[Message] = [{k: v for k, v in m.items() if k != "weight"} for m in trajectory.messages()]
    turns = [
        k
        for k, m in enumerate(trajectory.messages())
        if m.get("role") == "assistant" and m.get("weight", 1) != 0
    ]
    if not turns:
        raise ValueError(
            "This trajectory has no assistant message to train on (none, or all with weight 0), so there is "
            "nothing to fine-tune on."
        )
    if turns[0] == 0:
        raise ValueError("The trajectory starts with an assistant message; put its prompt before it.")

    def render(msgs: list[Message], gen: bool) -> str:
        return render_prompt(tokenizer, msgs, tools=trajectory.tools, add_generation_prompt=gen)

    ids: list[int] = []
    mask: list[int] = []
    spans: list[tuple[int, int]] = []
    emitted = ""
    for k in turns:
        prompt = render(messages[:k], gen=True)
        context = tokenizer.encode(_delta(emitted, prompt, k), add_special_tokens=False)
        ids += context
        mask += [0] * len(context)
        emitted = render(messages[: k + 1], gen=False)
        answer = tokenizer.encode(_delta(prompt, emitted, k), add_special_tokens=False)
        spans.append((len(ids), len(ids) + len(answer)))
        ids += answer
        mask += [1] * len(answer)
    truncated = len(ids) > max_len
    if truncated:
        if on_overflow == "error":
            raise ValueError(
                f"Trajectory is {len(ids)} tokens, over the limit of {max_len}. Raise max_seq_len or pass "
                "on_overflow='truncate'."
            )
        ids, mask = ids[:max_len], mask[:max_len]
        spans = [(s, min(e, max_len)) for s, e in spans if s < max_len]
    return TokenizedTrajectory(ids, mask, [0.0] * len(ids), spans, truncated)
