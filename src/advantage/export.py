"""Export a checkpoint for use outside advantage (`advantage export NAME@STEP --out DIR [--merged]`).

- The adapter (default): the step's PEFT files, `adapter_config.json` and `adapter_model.safetensors`, which
  `peft.PeftModel.from_pretrained(base, DIR)` loads onto the base model.
- Merged (`merged=True`): a full Hugging Face model directory with the LoRA folded into the base weights
  (config, safetensors weights, tokenizer, chat template, generation config), which
  `transformers.AutoModelForCausalLM.from_pretrained(DIR)` and vLLM load like any checkpoint. The merge is done
  in float32 and the result is saved in the base model's own dtype.

The optimizer state and advantage's `trainer_state.json` stay behind. The export is written under a temporary
name beside `out` and renamed into place, so `out` is either complete or absent.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from advantage.engine.models import resolve_model_path
from advantage.files import write_dir_atomic
from advantage.registry import check_name
from advantage.training import checkpoints as ckpt

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def export_checkpoint(
    ref: str,
    out: str | Path,
    *,
    root: str | Path = ".advantage",
    project: str = "default",
    merged: bool = False,
) -> Path:
    """Write checkpoint `ref` (`name@step`, `name` for its latest step, or `project/name@step`) of the run
    under `root` to the directory `out` (new, or empty): the PEFT adapter, or with `merged` a full model.
    Returns `out`. Raises ValueError, saying what exists, for a checkpoint that is not on disk."""
    project, name, step = ckpt.parse_ref(ref, project)
    check_name("project", project)
    check_name("model name", name)
    mdir = ckpt.model_dir(Path(root), project, name)
    steps = ckpt.list_steps(mdir)
    if not steps:
        raise ValueError(
            f"No checkpoints of {project}/{name} under {root} (are --root and --project right?)."
        )
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ValueError(f"Step {step} of {project}/{name} is not on disk; steps on disk: {steps}.")
    src = ckpt.step_dir(mdir, step)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not an empty directory; pick a new --out.")

    def write(tmp: Path) -> None:
        if merged:
            _write_merged(src, base_model_path(mdir, src), tmp)
        else:
            for f in ADAPTER_FILES:
                shutil.copy2(src / f, tmp / f)

    # an empty `out` (checked above) steps aside and is removed once the export is in its place
    write_dir_atomic(out, write, f".tmp-export-{out.name}-", f".old-export-{out.name}-")
    return out


def base_model_path(mdir: Path, step_dir: Path) -> Path:
    """The base model a run trained on: as registered (step 0's state), else as the adapter records it."""
    state = ckpt.read_state(mdir, 0) if (ckpt.step_dir(mdir, 0) / ckpt.STATE_FILE).exists() else {}
    base = state.get("base_model")
    if base is None:
        base = json.loads((step_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    return resolve_model_path(str(base))


def _write_merged(adapter_dir: Path, base_path: Path, out: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype="auto")
    dtype = model.dtype
    # transformers' `to` is wrapped (functools.wraps), which hides its bound signature from mypy
    merged = PeftModel.from_pretrained(model.to(torch.float32), adapter_dir).merge_and_unload()  # type: ignore[arg-type]
    merged.to(dtype).save_pretrained(out)  # config.json, model.safetensors, generation_config.json
    # The tokenizer files, chat template included (chat_template.jinja).
    AutoTokenizer.from_pretrained(base_path).save_pretrained(out)
