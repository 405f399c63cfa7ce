"""Trajectory → (ids, mask, old logprobs) on SmolLM2's real tokenizer and ChatML template."""

from __future__ import annotations

import pytest
from openai.types.chat.chat_completion import Choice

from advantage.engine.chat import parse_assistant_output, render_prompt
from advantage.training.tokenize import tokenize_trajectory
from advantage.trajectory import Trajectory

EOS = 2  # <|im_end|>
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def make_choice(
    tokenizer, text: str, context: list, tools=None, eos: bool = True, lp_start: float = -0.5
) -> Choice:
    """A Choice as our backend returns it: sampled ids (+EOS), their logprobs, and the prompt ids."""
    ids = tokenizer.encode(text, add_special_tokens=False) + ([EOS] if eos else [])
    parsed = parse_assistant_output(text, tools_enabled=bool(tools))
    prompt = render_prompt(tokenizer, context, tools=tools)
    return Choice.model_validate(
        {
            "index": 0,
            "finish_reason": ("tool_calls" if parsed.tool_calls else "stop") if eos else "length",
            "message": {
                "role": "assistant", "content": parsed.content, "tool_calls": parsed.tool_calls or None
            },
            "token_ids": ids,
            "token_logprobs": [lp_start - 0.01 * i for i in range(len(ids))],
            "prompt_token_ids": tokenizer(prompt, add_special_tokens=False)["input_ids"],
            "weights": {"model": "m", "step": 0},
        }
    )


def tool_trajectory(tokenizer) -> Trajectory:
    """system, user, Choice (tool call), tool result, Choice (final answer), then a trailing user message."""
    items: list = [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "What is the weather in Paris?"},
    ]
    traj = Trajectory(messages_and_choices=items, tools=[WEATHER])
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    items.append(make_choice(tokenizer, call, traj.messages(), tools=[WEATHER], lp_start=-0.1))
    tool_call_id = items[-1].message.tool_calls[0].id
    items.append({"role": "tool", "tool_call_id": tool_call_id, "content": '{"temp_c": 18}'})
    answer = "It is 18C in Paris."
    items.append(make_choice(tokenizer, answer, traj.messages(), tools=[WEATHER], lp_start=-1.0))
    items.append({"role": "user", "content": "Thanks!"})
    return traj


def test_tool_trajectory_spans_mask_and_logprobs(tokenizer):
    traj = tool_trajectory(tokenizer)
    out = tokenize_trajectory(tokenizer, traj, max_len=4096)
    choices = traj.choices()
    n = len(out.input_ids)
    assert len(out.assistant_mask) == len(out.old_logprobs) == n
    assert not out.truncated
    assert len(out.choice_spans) == 2

    masked = set()
    for (s, e), c in zip(out.choice_spans, choices, strict=True):
        assert out.input_ids[s:e] == c.model_extra["token_ids"]  # exact sampled ids, EOS included
        assert out.old_logprobs[s:e] == c.model_extra["token_logprobs"]
        assert out.assistant_mask[s:e] == [1] * (e - s)
        masked.update(range(s, e))
    assert {i for i, m in enumerate(out.assistant_mask) if m} == masked  # the mask covers only the choices
    assert all(out.old_logprobs[i] == 0.0 for i in range(n) if i not in masked)

    # The sequence starts with the exact prompt the first Choice was sampled from, and its context before the
    # second Choice is the second prompt (the template is ChatML, so nothing drifts here).
    assert out.input_ids[: out.choice_spans[0][0]] == choices[0].model_extra["prompt_token_ids"]
    assert out.input_ids[: out.choice_spans[1][0]] == choices[1].model_extra["prompt_token_ids"]

    # Each sampled EOS is followed by the template's "\n" alone (not a second <|im_end|>), and the trailing
    # user message after the last Choice is dropped.
    s0, e0 = out.choice_spans[0]
    assert out.input_ids[e0 - 1] == EOS and out.input_ids[e0] != EOS
    assert tokenizer.decode(out.input_ids[e0:e0 + 1]) == "\n"
    assert out.input_ids[out.choice_spans[1][1]:] == tokenizer.encode("\n", add_special_tokens=False)
    assert "Thanks!" not in tokenizer.decode(out.input_ids)

    # The whole thing equals a plain tokenization of the rendered conversation up to the last Choice.
    full = render_prompt(tokenizer, traj.messages()[:5], tools=[WEATHER], add_generation_prompt=False)
    assert out.input_ids == tokenizer.encode(full, add_special_tokens=False)


def test_choice_ids_are_not_retokenized(tokenizer):
    """Sampled ids that a re-tokenization would merge differently survive as sampled."""
    context = [{"role": "user", "content": "Say hello."}]
    choice = make_choice(tokenizer, "Hello", context)
    odd = tokenizer.encode("Hel", add_special_tokens=False) + tokenizer.encode("lo", add_special_tokens=False)
    assert odd != tokenizer.encode("Hello", add_special_tokens=False)
    choice = Choice.model_validate(
        {**choice.model_dump(), "token_ids": [*odd, EOS], "token_logprobs": [-0.1] * (len(odd) + 1)}
    )
    out = tokenize_trajectory(tokenizer, Trajectory([*context, choice]), max_len=1024)
    s, e = out.choice_spans[0]
    assert out.input_ids[s:e] == [*odd, EOS]


def test_plain_assistant_dicts_are_context(tokenizer):
    context = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},  # an example exchange: context, never trained
        {"role": "user", "content": "3+3?"},
    ]
    choice = make_choice(tokenizer, "6", context)
    out = tokenize_trajectory(tokenizer, Trajectory([*context, choice]), max_len=1024)
    assert sum(out.assistant_mask) == len(choice.model_extra["token_ids"]) == 2
    assert out.input_ids[: out.choice_spans[0][0]] == choice.model_extra["prompt_token_ids"]


def test_length_stopped_choice_gets_end_of_turn_as_context(tokenizer):
    """A Choice cut by max_tokens has no EOS: the template's full "<|im_end|>\\n" follows it, unmasked."""
    context = [{"role": "user", "content": "Count."}]
    first = make_choice(tokenizer, "1 2 3", context, eos=False)
    items = [*context, first, {"role": "user", "content": "Go on."}]
    second = make_choice(tokenizer, "4 5", Trajectory(items).messages())
    out = tokenize_trajectory(tokenizer, Trajectory([*items, second]), max_len=1024)
    s, e = out.choice_spans[0]
    assert out.input_ids[e : e + 2] == [EOS, *tokenizer.encode("\n", add_special_tokens=False)]
    assert out.assistant_mask[e] == 0
    assert out.input_ids[: out.choice_spans[1][0]] == second.model_extra["prompt_token_ids"]


def test_overflow_error_and_truncate(tokenizer):
    traj = tool_trajectory(tokenizer)
    n = len(tokenize_trajectory(tokenizer, traj, max_len=4096).input_ids)
    with pytest.raises(ValueError, match=rf"{n} tokens, over the limit of 50\. Raise max_seq_len"):
        tokenize_trajectory(tokenizer, traj, max_len=50)

    full = tokenize_trajectory(tokenizer, traj, max_len=4096)
    limit = full.choice_spans[0][0] + 3  # cut three tokens into the first Choice
    cut = tokenize_trajectory(tokenizer, traj, max_len=limit, on_overflow="truncate")
    assert cut.truncated
    assert cut.input_ids == full.input_ids[:limit]
    assert cut.assistant_mask == full.assistant_mask[:limit]
    assert cut.old_logprobs == full.old_logprobs[:limit]
    assert cut.choice_spans == [(full.choice_spans[0][0], limit)]

    exact = tokenize_trajectory(tokenizer, traj, max_len=n, on_overflow="truncate")
    assert not exact.truncated and exact.input_ids == full.input_ids


def test_choice_without_token_ids_raises(tokenizer):
    context = [{"role": "user", "content": "hi"}]
    foreign = Choice.model_validate(
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hello"}}
    )
    with pytest.raises(ValueError, match="did not come from an advantage backend; pass it as a plain dict"):
        tokenize_trajectory(tokenizer, Trajectory([*context, foreign]), max_len=1024)


def test_grammar_forced_tokens_are_context_not_trained(tokenizer):
    """Where the grammar left one token to pick, the sampled token stays in the sequence but out of the mask:
    the acting policy's logprob there is 0, whatever the weights."""
    context = [{"role": "user", "content": "Weather in Paris?"}]
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    choice = make_choice(tokenizer, call, context, tools=[WEATHER])
    n = len(choice.model_extra["token_ids"])
    forced = [0, 1, 2, n - 2]
    choice = Choice.model_validate({**choice.model_dump(), "forced_token_indices": forced})
    out = tokenize_trajectory(tokenizer, Trajectory([*context, choice], tools=[WEATHER]), max_len=4096)
    s, e = out.choice_spans[0]
    assert out.input_ids[s:e] == choice.model_extra["token_ids"]
    assert out.assistant_mask[s:e] == [0 if i in forced else 1 for i in range(n)]

    bad = Choice.model_validate({**choice.model_dump(), "forced_token_indices": [n]})
    with pytest.raises(ValueError, match="forced_token_indices outside"):
        tokenize_trajectory(tokenizer, Trajectory([*context, bad], tools=[WEATHER]), max_len=4096)


def test_mismatched_logprobs_raise(tokenizer):
    context = [{"role": "user", "content": "hi"}]
    choice = make_choice(tokenizer, "hello", context)
    bad = Choice.model_validate({**choice.model_dump(), "token_logprobs": [-0.1]})
    with pytest.raises(ValueError, match="same length"):
        tokenize_trajectory(tokenizer, Trajectory([*context, bad]), max_len=1024)


def test_trajectory_without_choices_raises(tokenizer):
    with pytest.raises(ValueError, match="nothing to train on"):
        tokenize_trajectory(tokenizer, Trajectory([{"role": "user", "content": "hi"}]), max_len=1024)
