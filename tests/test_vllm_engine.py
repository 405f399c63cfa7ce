"""VLLMEngine where vLLM cannot run (this CPU machine): how it is chosen, how it fails without vLLM, and its
own bookkeeping of vLLM's outputs.

The contract itself (`tests/test_engine_contract.py`, id `vllm-fp32`) needs CUDA and vLLM and has never run.
The output tests below feed `_Choice` stand-ins shaped like vLLM's `CompletionOutput` deltas and `Logprob`
entries (fields as in vLLM's `outputs.py` and `logprobs.py`), since vLLM itself cannot be installed here.
"""

from __future__ import annotations

import asyncio
import importlib.util
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from advantage.engine.base import Completion
from advantage.engine.grammar import GrammarCompiler, grammar_for_tool_choice, grammar_from_response_format
from advantage.engine.replicas import ReplicaPlacement, engine_factory
from advantage.engine.vllm_engine import VLLMEngine, _Choice, _copy, _top, vllm_grammar

NO_VLLM = importlib.util.find_spec("vllm") is None


def _lp(logprob: float, rank: int) -> SimpleNamespace:
    return SimpleNamespace(logprob=logprob, rank=rank, decoded_token=None)


def _delta(ids: list[int], entries: list[dict[int, SimpleNamespace]], text: str, finish: str | None = None):
    return SimpleNamespace(token_ids=ids, logprobs=entries, text=text, finish_reason=finish, index=0)


@pytest.mark.skipif(not NO_VLLM, reason="vLLM is installed: nothing to refuse")
def test_without_vllm_the_factory_says_how_to_install_it() -> None:
    with pytest.raises(ImportError, match="requirements-gpu.txt"):
        engine_factory(ReplicaPlacement(), {"max_pending": 8}, "vllm")


@pytest.mark.skipif(not NO_VLLM, reason="vLLM is installed: nothing to refuse")
def test_serve_with_engine_vllm_fails_with_the_install_hint() -> None:
    from advantage.cli import app

    result = CliRunner().invoke(app, ["serve", "--engine", "vllm", "--port", "7989"])
    assert result.exit_code == 2
    assert "requirements-gpu.txt" in result.output and "Traceback" not in result.output


def test_vllm_replicas_on_ray_and_unknown_engines_are_refused() -> None:
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        engine_factory(ReplicaPlacement(replicas=2), {}, "vllm")
    with pytest.raises(ValueError, match="'torch' or 'vllm'"):
        engine_factory(ReplicaPlacement(), {}, "sglang")  # type: ignore[arg-type]
    assert engine_factory(ReplicaPlacement(), {}, "torch") is None  # the in-process TorchEngine


def test_deltas_add_up_to_one_completion_with_its_logprobs_and_top_tokens() -> None:
    c = _Choice()
    # the sampled token 7 ranked 3rd: vLLM adds it to the top-2 entries
    c.extend(
        _delta(
            [5, 7],
            [{5: _lp(-0.1, 1), 9: _lp(-2.5, 2)}, {3: _lp(-0.5, 1), 4: _lp(-1.0, 2), 7: _lp(-1.5, 3)}],
            "He",
        ),
        2,
    )
    c.extend(_delta([2], [{2: _lp(-0.05, 1), 8: _lp(-3.0, 2)}], "llo", "stop"), 2)
    done = c.completion()
    assert done.token_ids == [5, 7, 2] and done.text == "Hello" and done.finish_reason == "stop"
    assert done.logprobs == [-0.1, -1.5, -0.05]
    assert done.top_logprobs == [[(5, -0.1), (9, -2.5)], [(3, -0.5), (4, -1.0)], [(2, -0.05), (8, -3.0)]]
    again = _copy(done)
    assert again == done and again.token_ids is not done.token_ids


def test_finish_reasons_map_onto_the_contract() -> None:
    for reason, want in (("length", "length"), ("stop", "stop"), ("repetition", "stop")):
        c = _Choice()
        c.extend(_delta([1], [{1: _lp(-0.2, 1)}], "a", reason), 0)
        assert c.completion().finish_reason == want and c.completion().top_logprobs == []
    aborted = _Choice()
    aborted.extend(_delta([], [], "", "abort"), 0)
    with pytest.raises(asyncio.CancelledError):
        aborted.completion()
    failed = _Choice()
    failed.extend(_delta([1], [{1: _lp(-0.2, 1)}], "a", "error"), 0)
    with pytest.raises(RuntimeError, match="retry"):
        failed.completion()


def test_an_abort_without_new_tokens_is_a_cancel_whatever_logprobs_it_repeats() -> None:
    """vLLM slices a delta's logprobs as [-len(token_ids):], so a final delta with no new tokens carries all
    of the choice's logprobs again."""
    c = _Choice()
    c.extend(_delta([1], [{1: _lp(-0.2, 1)}], "a"), 0)
    c.extend(_delta([], [{1: _lp(-0.2, 1)}], "", "abort"), 0)
    assert c.ids == [1] and c.logprobs == [-0.2]
    with pytest.raises(asyncio.CancelledError):
        c.completion()


def test_a_delta_without_logprobs_is_an_error_not_a_silent_gap() -> None:
    with pytest.raises(ValueError):
        _Choice().extend(_delta([1, 2], [{1: _lp(-0.2, 1)}], "ab"), 0)


def test_top_orders_by_rank_and_keeps_k() -> None:
    entry = {7: _lp(-1.5, 3), 3: _lp(-0.5, 1), 4: _lp(-1.0, 2)}
    assert _top(entry, 2) == [(3, -0.5), (4, -1.0)]
    assert _top(entry, 5) == [(3, -0.5), (4, -1.0), (7, -1.5)]


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {
                "type": "object",
                "properties": {"c": {"type": "string", "enum": ["A", "B"]}},
                "required": ["c"],
            },
        },
    }
]


def _accepts(tokenizer, lt, grammar: str, text: str) -> bool:
    import llguidance

    m = llguidance.LLMatcher(lt, grammar)
    return (
        all(m.consume_token(i) for i in tokenizer.encode(text, add_special_tokens=False)) and m.is_accepting()
    )


def test_grammars_reach_vllm_as_the_lark_its_guidance_backend_reads(tokenizer) -> None:
    """vLLM's guidance backend passes `grammar=` through `llguidance.grammar_from("grammar", ...)` (Lark or
    GBNF text), which refuses llguidance's serialized form of a JSON schema; unwrapped, the grammar admits
    what ours does (compact JSON) and refuses what ours refuses."""
    import llguidance
    import llguidance.hf

    lt = llguidance.hf.from_tokenizer(tokenizer)
    schema_grammar = grammar_from_response_format(
        {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}}
    )
    assert schema_grammar is not None
    with pytest.raises(ValueError):
        llguidance.grammar_from("grammar", schema_grammar)  # why the unwrapping is needed
    for ours in (schema_grammar, grammar_for_tool_choice(TOOLS, ["f"])):
        theirs = llguidance.grammar_from("grammar", vllm_grammar(ours))
        assert not llguidance.LLMatcher.validate_grammar(theirs, lt)
    theirs = llguidance.grammar_from("grammar", vllm_grammar(schema_grammar))
    for text, ok in (('{"a":5}', True), ('{"a": 5}', False), ('{"b":5}', False)):
        assert _accepts(tokenizer, lt, schema_grammar, text) is ok
        assert _accepts(tokenizer, lt, theirs, text) is ok


def test_the_eos_vllm_samples_after_a_completed_grammar_is_dropped(tokenizer) -> None:
    grammars = GrammarCompiler(tokenizer, len(tokenizer))
    grammar = grammar_for_tool_choice(TOOLS, ["f"])
    call = tokenizer.encode(
        '<tool_call>\n{"name": "f", "arguments": {"c": "A"}}\n</tool_call>', add_special_tokens=False
    )
    eos = tokenizer.eos_token_id
    c = Completion([*call, eos], [-0.5] * len(call) + [0.0], "...", "stop")
    VLLMEngine._settle_grammar(SimpleNamespace(grammars=grammars, stop_token_ids=[eos]), grammar, c)  # type: ignore[arg-type]
    assert c.token_ids == call and len(c.logprobs) == len(call) and c.finish_reason == "stop"
    assert c.forced and max(c.forced) < len(call)  # e.g. the keys and braces of the call
    kept = Completion(
        list(call), [-0.5] * len(call), "...", "stop"
    )  # a grammar that ended the request itself
    VLLMEngine._settle_grammar(SimpleNamespace(grammars=grammars, stop_token_ids=[eos]), grammar, kept)  # type: ignore[arg-type]
    assert kept.token_ids == call and kept.forced == c.forced
