"""The engine contract (`engine/base.py`), run against every engine we have.

Each engine is built by a factory from a small random Llama (SmolLM2's tokenizer, 2 layers, weights drawn
wide enough that its distributions are far from uniform: a logprob off by one position is off by nats).
The truth every engine is held to is an independent fp32 forward pass of the same weights on the CPU
(transformers, with peft for an adapter): sampled tokens' logprobs must equal it, whatever the batch.

Engines: TorchEngine on the CPU in fp32 with adapters merged into its weights, with peft's layers, and
without cascade attention, and in bf16 (CI); on CUDA in fp32 and bf16 (`gpu` marker: `pytest -m gpu tests/test_engine_contract.py`, skipped without
CUDA), and VLLMEngine on CUDA in fp32 (`gpu` marker, skipped without vLLM; never run yet). The Ray engine replicas
(`engine/replicas.py`) run these tests in `test_engine_replicas.py`, which imports them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from advantage.engine.base import Completion, ContextLengthError, Engine
from advantage.engine.grammar import grammar_for_tool_choice, grammar_from_response_format
from advantage.engine.sampling import SamplingError, SamplingParams

CONTEXT = 256  # every engine is built with this context, so a too-long prompt costs nothing


@dataclass(frozen=True)
class EngineSpec:
    make: Callable[[Path], Engine]
    device: str  # what it needs: "cpu" or "cuda"
    max_abs: float  # largest |engine logprob - fp32 reference| allowed on a sampled token
    mean_abs: float  # largest mean of it over a request's tokens
    # Whether equal logits give equal greedy tokens in any batch (fp32). bf16 batches of different shapes
    # may round differently and flip a near tie.
    exact_greedy: bool = True


def _torch(device: str, dtype: str, **kw: Any) -> Callable[[Path], Engine]:
    def make(model_dir: Path) -> Engine:
        from advantage.engine.torch_engine import TorchEngine

        return TorchEngine(model_dir, device=device, dtype=dtype, max_context=CONTEXT, **kw)

    return make


def _vllm(dtype: str) -> Callable[[Path], Engine]:
    def make(model_dir: Path) -> Engine:
        pytest.importorskip("vllm", reason="VLLMEngine needs vLLM: pip install -r requirements-gpu.txt")
        from advantage.engine.vllm_engine import VLLMEngine

        return VLLMEngine(
            model_dir, dtype=dtype, max_context=CONTEXT, gpu_memory_utilization=0.3, max_lora_rank=8,
            max_loras=2, enforce_eager=True,
        )  # fmt: skip

    return make


ENGINES = [
    pytest.param(EngineSpec(_torch("cpu", "float32", merge_lora=True), "cpu", 2e-4, 5e-5), id="torch-cpu-merged"),
    pytest.param(EngineSpec(_torch("cpu", "float32", merge_lora=False), "cpu", 2e-4, 5e-5), id="torch-cpu-peft"),
    # Cascade attention (engine/cascade.py) is on wherever the model allows; this is the path without it.
    pytest.param(EngineSpec(_torch("cpu", "float32", cascade=False), "cpu", 2e-4, 5e-5), id="torch-cpu-nocascade"),
    # bf16 against the fp32 reference: the bf16 decoder's own rounding (~0.06 nats mean, 0.3 max on this
    # model's wide weights, measured on a CPU), not the engine's; a token off by one position is off by nats.
    pytest.param(EngineSpec(_torch("cpu", "bfloat16"), "cpu", 0.6, 0.12, exact_greedy=False), id="torch-cpu-bf16"),
    pytest.param(
        EngineSpec(_torch("cuda", "float32"), "cuda", 2e-3, 5e-4), id="torch-cuda-fp32", marks=pytest.mark.gpu
    ),
    pytest.param(
        EngineSpec(_torch("cuda", "bfloat16"), "cuda", 0.6, 0.12, exact_greedy=False),
        id="torch-cuda-bf16",
        marks=pytest.mark.gpu,
    ),
    # Never run yet: no GPU machine we had could install vLLM (engine/vllm_engine.py).
    pytest.param(EngineSpec(_vllm("float32"), "cuda", 2e-3, 5e-4), id="vllm-fp32", marks=pytest.mark.gpu),
]

PROMPT = [1, 17, 923, 88, 4012, 77, 5, 3301, 12, 640, 9, 2718, 31, 44, 4500, 200, 18, 19, 20, 21]
OTHER = [1, 17, 923, 88, 4012, 77, 5, 3301, 999, 3, 1234, 55]  # shares a start with PROMPT
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}, "days": {"type": "integer"}},
                "required": ["city", "days"],
            },
        },
    }
]


@pytest.fixture(scope="module")
def model_dir(smollm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("contract-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
        initializer_range=0.3,  # mean entropy ~7 nats and logprobs spread by nats (0.02: ~uniform)
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(smollm_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Two LoRA adapters with a real effect (peft starts lora_B at zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = {}
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(model_dir),
            LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
        )
        for pname, p in model.named_parameters():
            if "lora_" in pname:
                torch.nn.init.normal_(p, std=0.3)
        out = tmp_path_factory.mktemp(f"adapter-{name}")
        model.save_pretrained(out)
        paths[name] = str(out)
    return paths


@pytest.fixture(scope="module")
def reference(model_dir: Path, adapters: dict[str, str]) -> Callable[..., list[Any]]:
    """(adapter path or None, prompt ids, completion ids) -> the completion's logprobs, fp32 on the CPU."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    models: dict[str | None, Any] = {}

    def logprobs(adapter: str | None, prompt: list[int], completion: list[int], argmax: bool = False) -> list[Any]:
        if adapter not in models:
            base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            models[adapter] = (base if adapter is None else PeftModel.from_pretrained(base, adapter)).eval()
        with torch.no_grad():
            logits = models[adapter](torch.tensor([prompt + completion])).logits[0].float()
        lp = logits.log_softmax(-1)[len(prompt) - 1 : len(prompt) + len(completion) - 1]
        if argmax:  # the greedy choice at each position instead
            return lp.argmax(-1).tolist()
        return lp.gather(1, torch.tensor(completion).unsqueeze(1)).squeeze(1).tolist()

    return logprobs


@pytest.fixture(scope="module", params=ENGINES)
def spec(request: pytest.FixtureRequest) -> EngineSpec:
    s: EngineSpec = request.param
    if s.device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return s


@pytest.fixture(scope="module")
def engine(spec: EngineSpec, model_dir: Path, one_torch_thread: None) -> Iterator[Engine]:
    e = spec.make(model_dir)
    yield e
    e.close()


def _run(engine: Engine, prompt: list[int], adapter: str | None = None, **kw: Any) -> list[Completion]:
    return engine.submit(prompt, SamplingParams(**kw), adapter=adapter).result(timeout=120)


def _assert_matches(spec: EngineSpec, got: list[float], want: list[float]) -> None:
    diff = (torch.tensor(got) - torch.tensor(want)).abs()
    assert diff.max() <= spec.max_abs and diff.mean() <= spec.mean_abs, (diff.max(), diff.mean())


def _check(spec: EngineSpec, reference: Any, c: Completion, prompt: list[int], adapter: str | None = None) -> None:
    assert len(c.token_ids) == len(c.logprobs) >= 1
    assert all(lp <= 0 for lp in c.logprobs)
    _assert_matches(spec, c.logprobs, reference(adapter, prompt, c.token_ids))


# ---------------------------------------------------------------------------------------------------- tests
def test_is_an_engine(engine: Engine) -> None:
    assert isinstance(engine, Engine)


def test_greedy_tokens_and_logprobs_are_the_forward_pass(engine: Engine, spec: EngineSpec, reference: Any) -> None:
    [c] = _run(engine, PROMPT, max_tokens=16, temperature=0.0)
    assert len(c.token_ids) <= 16 and c.finish_reason in ("stop", "length")
    _check(spec, reference, c, PROMPT)
    if spec.exact_greedy:  # each token is the argmax of the reference's distribution at its position
        assert c.token_ids == reference(None, PROMPT, c.token_ids, argmax=True)


def test_sampled_logprobs_are_the_forward_pass(engine: Engine, spec: EngineSpec, reference: Any) -> None:
    """Temperature and top_p change what is drawn, never the logprobs reported (the unmodified model's)."""
    for kw in ({"temperature": 1.0}, {"temperature": 0.7, "top_p": 0.9}, {"temperature": 1.6}):
        for c in _run(engine, PROMPT, max_tokens=12, n=3, seed=11, **kw):
            _check(spec, reference, c, PROMPT)


def test_max_tokens_and_length_finish(engine: Engine) -> None:
    for c in _run(engine, PROMPT, max_tokens=5, n=2, seed=3, temperature=1.0):
        assert len(c.token_ids) <= 5
        if c.finish_reason == "length":
            assert len(c.token_ids) == 5


def test_seed_reproduces_and_n_gives_distinct_choices(engine: Engine) -> None:
    first = _run(engine, PROMPT, max_tokens=12, n=4, seed=7, temperature=1.0)
    again = _run(engine, PROMPT, max_tokens=12, n=4, seed=7, temperature=1.0)
    other = _run(engine, PROMPT, max_tokens=12, n=4, seed=8, temperature=1.0)
    assert len(first) == 4
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert [c.token_ids for c in first] != [c.token_ids for c in other]
    assert len({tuple(c.token_ids) for c in first}) > 1  # n choices are n draws, not one copied


def test_unseeded_choices_leave_torchs_global_generator_alone(engine: Engine, spec: EngineSpec) -> None:
    """Rows without a seed draw from the engine's own generator. torch's global one is the whole process's:
    a trainer built on another thread meanwhile must start from its seed's adapter (`trainer.init_lora`)."""
    if spec.device != "cpu":
        pytest.skip("the CPU generator is the one an in-process CPU trainer shares")
    state = torch.get_rng_state()
    choices = _run(engine, PROMPT, max_tokens=12, n=4, temperature=1.0)
    assert len({tuple(c.token_ids) for c in choices}) > 1  # drawn, not copied
    assert torch.equal(torch.get_rng_state(), state)


def test_concurrent_requests_each_match_the_forward_pass(engine: Engine, spec: EngineSpec, reference: Any) -> None:
    """Requests batched together (different prompts, lengths and params) each answer as if alone."""
    alone = _run(engine, OTHER, max_tokens=10, temperature=0.0)[0]
    prompts = [PROMPT, OTHER, PROMPT[:9], OTHER + PROMPT]
    futures = [
        engine.submit(p, SamplingParams(max_tokens=10, temperature=0.0 if i % 2 else 1.0, n=1 + i % 3, seed=i))
        for i, p in enumerate(prompts)
    ]
    results = [f.result(timeout=120) for f in futures]
    for p, cs in zip(prompts, results, strict=True):
        for c in cs:
            _check(spec, reference, c, p)
    if spec.exact_greedy:
        assert results[1][0].token_ids == alone.token_ids


def test_stop_string_cuts_the_text(engine: Engine) -> None:
    [free] = _run(engine, PROMPT, max_tokens=24, temperature=0.0)
    text = free.text
    stop = next((text[i : i + 3] for i in range(4, len(text) - 3) if text[i : i + 3].strip()), None)
    if stop is None:
        pytest.skip(f"greedy text too short to pick a stop string from: {text!r}")
    [c] = _run(engine, PROMPT, max_tokens=24, temperature=0.0, stop=[stop])
    assert c.finish_reason == "stop"
    assert c.text == text[: text.find(stop)]
    assert c.token_ids == free.token_ids[: len(c.token_ids)]


def test_streamed_text_adds_up(engine: Engine) -> None:
    pieces: dict[int, list[str]] = {0: [], 1: []}
    fut = engine.submit(
        PROMPT, SamplingParams(max_tokens=16, n=2, seed=5), on_token=lambda i, s: pieces[i].append(s)
    )
    out = fut.result(timeout=120)
    assert ["".join(pieces[i]) for i in (0, 1)] == [c.text for c in out]


def test_forced_tool_call_follows_its_grammar(engine: Engine, spec: EngineSpec, reference: Any) -> None:
    grammar = grammar_for_tool_choice(TOOLS, ["get_weather"])
    for c in _run(engine, PROMPT, max_tokens=60, n=3, seed=1, temperature=1.0, grammar=grammar):
        assert c.finish_reason == "stop", c.text  # the grammar completed
        body = c.text.strip().removeprefix("<tool_call>").removesuffix("</tool_call>")
        call = json.loads(body)
        assert call["name"] == "get_weather"
        assert call["arguments"]["city"] in ("Paris", "Oslo") and isinstance(call["arguments"]["days"], int)
        assert c.forced and all(0 <= i < len(c.token_ids) for i in c.forced)  # '<tool_call>', keys, braces
        assert engine.grammars.replay(grammar, c.token_ids) == (c.forced, len(c.token_ids))  # as replayed
        _check(spec, reference, c, PROMPT)  # still the unconstrained model's logprobs


def test_response_format_json_schema(engine: Engine) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "pick": {"type": "string", "enum": ["x", "yy"]}},
        "required": ["ok", "pick"],
        "additionalProperties": False,
    }
    grammar = grammar_from_response_format({"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    assert grammar is not None
    engine.grammars.validate(grammar)
    for c in _run(engine, PROMPT, max_tokens=40, n=2, seed=2, grammar=grammar):
        assert c.finish_reason == "stop"
        obj = json.loads(c.text)
        assert set(obj) == {"ok", "pick"} and obj["pick"] in ("x", "yy")


def test_adapters_load_replace_and_unload(
    engine: Engine, spec: EngineSpec, reference: Any, adapters: dict[str, str]
) -> None:
    long_prompt = PROMPT * 3  # long enough for the prefix cache: a swap must not serve stale KV states
    [base] = _run(engine, long_prompt, max_tokens=10, temperature=0.0)
    engine.load_adapter("c", adapters["a"])
    try:
        assert "c" in engine.adapters()
        [with_a] = _run(engine, long_prompt, "c", max_tokens=10, temperature=0.0)
        _check(spec, reference, with_a, long_prompt, adapters["a"])
        assert with_a.token_ids != base.token_ids
        [base_again] = _run(engine, long_prompt, max_tokens=10, temperature=0.0)  # base unaffected by "c"
        _check(spec, reference, base_again, long_prompt)
        engine.load_adapter("c", adapters["b"])  # replace under the same name
        [with_b] = _run(engine, long_prompt, "c", max_tokens=10, temperature=0.0)
        _check(spec, reference, with_b, long_prompt, adapters["b"])
        assert with_b.token_ids != with_a.token_ids
    finally:
        engine.remove_adapter("c")
    assert "c" not in engine.adapters()
    with pytest.raises(KeyError):
        engine.submit(long_prompt, SamplingParams(max_tokens=2), adapter="c")
    engine.remove_adapter("c")  # removing what is not loaded is a no-op
    [after] = _run(engine, long_prompt, max_tokens=10, temperature=0.0)
    _check(spec, reference, after, long_prompt)
    if spec.exact_greedy:
        assert after.token_ids == base.token_ids


def test_score_is_the_forward_pass_with_its_top_tokens(
    engine: Engine, spec: EngineSpec, reference: Any, adapters: dict[str, str]
) -> None:
    """`score` gives each position's logprob under the requested weights and, with top_k, the top_k tokens
    there: their logprobs descend and each is the reference's logprob of the id it names."""
    seqs = [PROMPT + [5, 6, 7, 8], PROMPT + [9, 10], PROMPT[:4]]
    engine.load_adapter("s", adapters["a"])
    try:
        for adapter, path in ((None, None), ("s", adapters["a"])):
            scores = engine.score(seqs, adapter, top_k=4).result(timeout=120)
            assert engine.score(seqs, adapter).result(timeout=120).logprobs == scores.logprobs
            for seq, lp, ids, lps in zip(
                seqs, scores.logprobs, scores.top_ids, scores.top_logprobs, strict=True
            ):
                assert lp[0] == 0.0 and ids[0] == [] and len(lp) == len(ids) == len(seq)
                _assert_matches(spec, lp[1:], reference(path, seq[:1], seq[1:]))
                got, want = [], []
                for j in range(1, len(seq)):
                    assert len(ids[j]) == 4 and lps[j] == sorted(lps[j], reverse=True)
                    got += lps[j]
                    want += [reference(path, seq[:j], [t])[0] for t in ids[j]]
                _assert_matches(spec, got, want)
    finally:
        engine.remove_adapter("s")
    # the base again, with no adapter served (peft may still hold the last one removed)
    again = engine.score(seqs).result(timeout=120)
    for seq, lp in zip(seqs, again.logprobs, strict=True):
        _assert_matches(spec, lp[1:], reference(None, seq[:1], seq[1:]))
    with pytest.raises(ValueError, match="top_k"):
        engine.score(seqs, top_k=-1)


def test_bad_requests_fail_at_submit(engine: Engine) -> None:
    with pytest.raises(ContextLengthError):
        engine.submit(list(range(3, 3 + CONTEXT)), SamplingParams(max_tokens=1))
    with pytest.raises(ContextLengthError):
        engine.submit(PROMPT, SamplingParams(max_tokens=CONTEXT))
    with pytest.raises(ContextLengthError):
        engine.check_fits(CONTEXT, None)
    assert engine.check_fits(CONTEXT - 10, None) == 10
    assert engine.check_fits(len(PROMPT), 7) == 7
    with pytest.raises(SamplingError):
        engine.submit(PROMPT, SamplingParams(temperature=-1.0))
    with pytest.raises(KeyError):
        engine.submit(PROMPT, SamplingParams(max_tokens=2), adapter="never-loaded")
    [c] = _run(engine, PROMPT, max_tokens=3)  # and the engine still serves
    assert len(c.token_ids) <= 3


async def test_generate_is_submit_awaited(engine: Engine) -> None:
    got = await engine.generate(PROMPT, SamplingParams(max_tokens=8, seed=9, n=2))
    want = _run(engine, PROMPT, max_tokens=8, seed=9, n=2)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]


def test_service_serves_through_the_engine_factory(model_dir: Path, tmp_path: Path) -> None:
    """`Service(engine_factory=...)` is how another engine is plugged in: it is asked once per base model."""
    from advantage.engine.torch_engine import TorchEngine
    from advantage.service import Service

    made: list[Path] = []

    def factory(path: Path) -> Engine:
        made.append(path)
        return TorchEngine(path, device="cpu", dtype="float32", max_context=CONTEXT)

    service = Service(tmp_path, engine_factory=factory)
    try:
        engine = service.engine(str(model_dir))
        assert service.engine(str(model_dir)) is engine and made == [model_dir]
        weights = service.resolve(str(model_dir))
        assert weights.engine is engine and weights.adapter is None
        assert len(_run(weights.engine, PROMPT, max_tokens=3)[0].token_ids) <= 3
    finally:
        service.close()
