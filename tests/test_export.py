"""`advantage export`: the PEFT adapter loads with peft onto the base; `--merged` is a full Hugging Face model
that transformers loads on its own and that gives the logits of base + adapter (the bundled model, fp32)."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from advantage.cli import app
from advantage.config import LoRAConfig
from advantage.export import export_checkpoint
from advantage.training import checkpoints as ckpt
from advantage.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")
IDS = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 30, 2]])  # any ids will do


def _run(root: Path, base: Path, lora: LoRAConfig) -> None:
    """A run `p/m` with steps 0 (empty adapter) and 1 (a LoRA with random, non-zero weights), written as the
    service writes them."""
    trainer = Trainer(base, lora, dtype="float32")
    mdir = ckpt.model_dir(root, "p", "m")
    state = {"base_model": str(base), "lora": lora.model_dump()}
    ckpt.write_step(mdir, 0, trainer.save, state)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in trainer.params:
            p.normal_(std=0.02)
    ckpt.write_step(mdir, 1, trainer.save, state)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def test_adapter_export_loads_with_peft(tiny_model_dir: Path, tmp_path: Path) -> None:
    _run(tmp_path, tiny_model_dir, LoRAConfig(r=4))
    out = export_checkpoint("m@1", tmp_path / "adapter", root=tmp_path, project="p")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    plain = _logits(base)
    tuned = _logits(PeftModel.from_pretrained(base, out))
    trainer = Trainer(tiny_model_dir, LoRAConfig(r=4), dtype="float32", device="cpu")  # beside `base`
    trainer.load(ckpt.step_dir(ckpt.model_dir(tmp_path, "p", "m"), 1))
    torch.testing.assert_close(tuned, _logits(trainer.model))
    assert (tuned - plain).abs().max() > 1e-3  # the adapter does something


def test_bad_exports_say_what_exists(tiny_model_dir: Path, tmp_path: Path) -> None:
    _run(tmp_path, tiny_model_dir, LoRAConfig(r=4))
    with pytest.raises(ValueError, match=r"Step 5 of p/m is not on disk; steps on disk: \[0, 1\]"):
        export_checkpoint("m@5", tmp_path / "x", root=tmp_path, project="p")
    with pytest.raises(ValueError, match="No checkpoints of q/m"):
        export_checkpoint("q/m@1", tmp_path / "x", root=tmp_path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an empty directory"):
        export_checkpoint("p/m", tmp_path / "full", root=tmp_path)
    assert not (tmp_path / "x").exists() and [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]


def test_cli_export(tiny_model_dir: Path, tmp_path: Path) -> None:
    _run(tmp_path, tiny_model_dir, LoRAConfig(r=4))
    runner = CliRunner()
    args = ["export", "m", "--out", str(tmp_path / "a"), "--project", "p", "--root", str(tmp_path)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == (
        ckpt.step_dir(ckpt.model_dir(tmp_path, "p", "m"), 1) / "adapter_model.safetensors"
    ).read_bytes()
    res = runner.invoke(app, ["export", "m@9", "--out", str(tmp_path / "b"), "--root", str(tmp_path)])
    assert res.exit_code == 2 and "No checkpoints of default/m" in res.output


def test_merged_export_of_the_bundled_model(smollm_dir: Path, tmp_path: Path) -> None:
    _run(tmp_path, smollm_dir, LoRAConfig())
    gc.collect()
    out = export_checkpoint("p/m@1", tmp_path / "merged", root=tmp_path, merged=True)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    assert {"tokenizer_config.json", "chat_template.jinja"} <= names

    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.float32 and not isinstance(merged, PeftModel)
    got = _logits(merged)
    del merged
    base = AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32)
    plain = _logits(base)
    adapter = ckpt.step_dir(ckpt.model_dir(tmp_path, "p", "m"), 1)
    want = _logits(PeftModel.from_pretrained(base, adapter))
    # fp32 throughout: only the order of the additions differs (W + BA against Wx + B(Ax)).
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    assert (want - plain).abs().max() > 100 * (got - want).abs().max()  # the LoRA is really in there

    messages = [{"role": "user", "content": "Hi"}]
    theirs = AutoTokenizer.from_pretrained(out).apply_chat_template(messages, tokenize=False)
    assert theirs == AutoTokenizer.from_pretrained(smollm_dir).apply_chat_template(messages, tokenize=False)
