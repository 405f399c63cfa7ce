"""Turn a `Trajectory` into one token sequence with a mask over the tokens the policy sampled.

Token-in / token-out: each Choice contributes the exact ids the backend sampled (`model_extra["token_ids"]`)
and their recorded logprobs; its text is never re-tokenized, because re-tokenizing a model's own output can
give different ids than it sampled, and the ratio exp(logp_new - logp_old) would then compare different
tokens. Only the context (plain message dicts, tool results, the template's turn markers) is tokenized.

The sequence is built left to right. At the k-th item, when it is a Choice, the context text is
`render_prompt(messages[:k], add_generation_prompt=True)`; only its new part since the text already emitted
is tokenized. This relies on the chat template being concatenative (each turn's text is a prefix of the
next render, as in ChatML); a template that rewrites earlier turns raises. After a Choice, the template's
end-of-turn suffix (e.g. "<|im_end|>\\n") is appended as context, minus the EOS token when the sampled ids
already end with it. Context after the last Choice is dropped: there is nothing to train on there.

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
from advantage.trajectory import Message, Trajectory

# Stands in for an assistant turn's content, to read off the template's end-of-turn suffix.
_SENTINEL = "\u2063ADVANTAGE-SENTINEL\u2063"


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
    if on_overflow not in ("error", "truncate"):
        raise ValueError(f"on_overflow must be 'error' or 'truncate', got {on_overflow!r}.")
    items = trajectory.messages_and_choices
    last = max((k for k, m in enumerate(items) if isinstance(m, Choice)), default=-1)
    if last < 0:
        raise ValueError(
            "This trajectory has no Choice, so there is nothing to train on; keep at least one completion "
            "returned by the backend in messages_and_choices."
        )
    messages: list[Message] = trajectory.messages()
    eos_id = tokenizer.eos_token_id
    eos_text = tokenizer.convert_ids_to_tokens(eos_id) if eos_id is not None else None

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
            raise ValueError(
                "messages_and_choices starts with a Choice; put the messages it was sampled from before it."
            )
        prompt = render(messages[:k], gen=True)
        emit_context(_delta(emitted, prompt, k))

        spans.append((len(ids), len(ids) + len(sampled)))
        ids.extend(sampled)
        mask.extend(0 if i in forced else 1 for i in range(len(sampled)))
        logprobs.extend(sampled_lp)

        suffix = _turn_suffix(render, messages[:k], prompt)
        if sampled and sampled[-1] == eos_id and eos_text and suffix.startswith(eos_text):
            suffix = suffix[len(eos_text) :]
        emit_context(suffix)
        emitted = render(messages[: k + 1], gen=False)
        _delta(prompt, emitted, k)  # the assistant turn must extend its own prompt

    truncated = False
    if len(ids) > max_len:
        if on_overflow == "error":
            raise ValueError(
                f"Trajectory is {len(ids)} tokens, over the limit of {max_len}. Raise max_seq_len, or "
                "shorten the rollout (fewer turns, shorter tool results, lower max_tokens); or pass "
                "on_overflow='truncate' to cut it."
            )
        ids, mask, logprobs = ids[:max_len], mask[:max_len], logprobs[:max_len]
        spans = [(s, min(e, max_len)) for s, e in spans if s < max_len]
        truncated = True
    return TokenizedTrajectory(ids, mask, logprobs, spans, truncated)


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
        raise ValueError(
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
