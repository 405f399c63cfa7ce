"""Trajectory → (ids, mask, old logprobs) on SmolLM2's real tokenizer: its ChatML template, and Qwen3's."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from openai.types.chat.chat_completion import Choice

from advantage.config import TrainConfig
from advantage.engine.chat import parse_assistant_output, render_prompt
from advantage.engine.renderers import renderer_for
from advantage.training.grpo import build_datums
from advantage.training.tokenize import (
    HistoryRewrittenError,
    tokenize_for_training,
    tokenize_trajectory,
    tokenize_turns,
)
from advantage.trajectory import Trajectory, TrajectoryGroup

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
                "role": "assistant",
                "content": parsed.content,
                "tool_calls": parsed.tool_calls or None,
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
    assert tokenizer.decode(out.input_ids[e0 : e0 + 1]) == "\n"
    assert out.input_ids[out.choice_spans[1][1] :] == tokenizer.encode("\n", add_special_tokens=False)
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


# ------------------------------------------------------------------ a template that rewrites history (Qwen3)

QWEN3_TEMPLATE = Path(__file__).parent / "fixtures" / "templates" / "Qwen-Qwen3-0.6B.jinja"


@pytest.fixture(scope="module")
def qwen3_tokenizer(smollm_dir):
    """SmolLM2's tokenizer (its <|im_start|>/<|im_end|> are special tokens too) with Qwen3's chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm_dir)
    tok.chat_template = QWEN3_TEMPLATE.read_text()
    return tok


def thinking_trajectory(tok, reward: float = 0.0) -> Trajectory:
    """Two turns, the first with a think block, which Qwen3 drops from history once the user speaks again."""
    items: list = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    items.append(make_choice(tok, "<think>\nEasy: four.\n</think>\n\n4", list(items)))
    items.append({"role": "user", "content": "And 3+3?"})
    items.append(
        make_choice(tok, "<think>\nSix.\n</think>\n\n6", Trajectory(items).messages(), lp_start=-1.0)
    )
    return Trajectory(items, reward=reward)


def test_history_rewriting_template_trains_one_sequence_per_turn(qwen3_tokenizer):
    tok = qwen3_tokenizer
    assert renderer_for(tok).name == "qwen3"
    traj = thinking_trajectory(tok)
    with pytest.raises(HistoryRewrittenError):
        tokenize_trajectory(tok, traj, max_len=4096)

    seqs = tokenize_for_training(tok, traj, max_len=4096)
    assert len(seqs) == 2
    for seq, choice in zip(seqs, traj.choices(), strict=True):
        [(s, e)] = seq.choice_spans
        extra = choice.model_extra
        assert seq.input_ids[:s] == extra["prompt_token_ids"]  # the context is what the sampler saw
        assert seq.input_ids[s:e] == extra["token_ids"] and e == len(seq.input_ids)
        assert seq.assistant_mask == [0] * s + [1] * (e - s)
        assert seq.old_logprobs[s:] == extra["token_logprobs"] and set(seq.old_logprobs[:s]) == {0.0}
    second_context = tok.decode(seqs[1].input_ids[: seqs[1].choice_spans[0][0]])
    assert "Easy: four." not in second_context  # Qwen3 dropped turn 1's thinking from what turn 2 saw
    assert second_context.endswith(
        "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_per_turn_context_is_rendered_when_the_choice_has_no_prompt_ids(qwen3_tokenizer):
    traj = thinking_trajectory(qwen3_tokenizer)
    recorded = [c.model_extra["prompt_token_ids"] for c in traj.choices()]
    traj.messages_and_choices = [
        Choice.model_validate({k: v for k, v in m.model_dump().items() if k != "prompt_token_ids"})
        if isinstance(m, Choice)
        else m
        for m in traj.messages_and_choices
    ]
    seqs = tokenize_turns(qwen3_tokenizer, traj, max_len=4096)
    assert [seq.input_ids[: seq.choice_spans[0][0]] for seq in seqs] == recorded


def test_per_turn_sequences_each_get_the_trajectory_advantage(qwen3_tokenizer):
    group = TrajectoryGroup(
        [thinking_trajectory(qwen3_tokenizer, 1.0), thinking_trajectory(qwen3_tokenizer, 0.0)]
    )
    trainer = SimpleNamespace(tokenizer=qwen3_tokenizer)
    datums, metrics = build_datums(trainer, [group], TrainConfig())
    assert len(datums) == 4 and metrics["n_sequences"] == 4 and metrics["n_trajectories"] == 2
    advantages = [d.advantage for d in datums]
    assert advantages[0] == advantages[1] > 0 > advantages[2] == advantages[3]


def test_concatenative_template_keeps_one_sequence(tokenizer):
    traj = tool_trajectory(tokenizer)
    [seq] = tokenize_for_training(tokenizer, traj, max_len=4096)
    assert seq == tokenize_trajectory(tokenizer, traj, max_len=4096) and len(seq.choice_spans) == 2
