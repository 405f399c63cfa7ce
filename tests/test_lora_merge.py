"""Adapters merged into the engine's fp32 weights (engine/lora.py) answer exactly as peft's LoRA layers do,
and switching adapters, or back to none, restores the base weights exactly."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from advantage.engine.sampling import SamplingParams
from advantage.engine.torch_engine import TorchEngine

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _adapter(model_dir, out, seed: int) -> str:
    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    for name, p in model.named_parameters():
        if "lora_" in name:  # lora_B starts at zero: give the adapter a real effect
            torch.nn.init.normal_(p, std=0.3)
    model.save_pretrained(out)
    return str(out)


def _answer(engine: TorchEngine, adapter: str | None) -> tuple[list[int], list[float]]:
    params = SamplingParams(max_tokens=12, temperature=0.0, top_logprobs=3)
    [c] = engine.submit([1, 17, 923, 88, 4012, 77, 5], params, adapter=adapter).result()
    return c.token_ids, c.logprobs


def test_merged_adapters_answer_as_peft_does(tiny_model_dir, tmp_path) -> None:
    paths = {k: _adapter(tiny_model_dir, tmp_path / k, seed) for k, seed in (("a", 1), ("b", 2))}
    merged = TorchEngine(tiny_model_dir, dtype="float32", merge_lora=True)
    peft = TorchEngine(tiny_model_dir, dtype="float32", merge_lora=False)
    try:
        base_before = _answer(merged, None)
        for engine in (merged, peft):
            for name, path in paths.items():
                engine.load_adapter(name, path)
        assert merged._merged is not None and peft._merged is None
        answers = {}
        for adapter in ("a", "b", None, "a"):  # switches: a -> b -> base -> a
            got, want = _answer(merged, adapter), _answer(peft, adapter)
            assert got[0] == want[0], adapter
            torch.testing.assert_close(torch.tensor(got[1]), torch.tensor(want[1]), atol=1e-4, rtol=0)
            answers[adapter] = got
        assert answers["a"][0] != answers["b"][0]  # the adapters really change the answer
        merged.remove_adapter("a")
        assert _answer(merged, None) == base_before  # back to the exact base weights
        merged.load_adapter("b", paths["a"])  # replacing an adapter under the same name
        assert _answer(merged, "b")[0] == answers["a"][0]
    finally:
        merged.close()
        peft.close()


def test_unsupported_adapters_are_refused_with_the_way_out(tiny_model_dir, tmp_path) -> None:
    import json

    path = _adapter(tiny_model_dir, tmp_path / "dora", 3)
    cfg = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    engine = TorchEngine(tiny_model_dir, dtype="float32", merge_lora=True)
    try:
        with pytest.raises(ValueError, match="merge_lora=False"):
            engine.load_adapter("d", path)
    finally:
        engine.close()


@pytest.mark.parametrize("merge", [True, False])
def test_removing_the_adapter_the_last_batch_used_leaves_the_engine_clean(
    tiny_model_dir, tmp_path, merge, caplog
) -> None:
    """The engine remembers the last batch's adapter; once it is removed, the next command (a load, a score)
    must not ask for it again (it used to log a KeyError from `MergedLora.activate` on every later step)."""
    engine = TorchEngine(tiny_model_dir, dtype="float32", merge_lora=merge)
    try:
        base = _answer(engine, None)
        engine.load_adapter("a", _adapter(tiny_model_dir, tmp_path / "a", 1))
        with_a = _answer(engine, "a")
        engine.remove_adapter("a")
        engine.load_adapter("b", _adapter(tiny_model_dir, tmp_path / "b", 2))
        engine.score([[1, 17, 923, 88]]).result()
        assert "engine step failed" not in caplog.text
        assert _answer(engine, None) == base
        assert _answer(engine, "b")[0] != with_a[0]
    finally:
        engine.close()
