"""Shared fixtures. Real models only: the bundled SmolLM2 (converted once into the cache dir) and a tiny
random Llama that reuses its tokenizer, for tests that need speed rather than quality."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Set here, before any test module loads torch: `import advantage` sets nothing (advantage.environment).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    """The bundled SmolLM2, or the directory in ADVANTAGE_TEST_MODEL_DIR: a machine without the bundled GGUF
    (a GPU box) gives a directory with SmolLM2's config and tokenizer files there (its weights may be
    random: tests that need the real model's quality then fail, the others run)."""
    override = os.environ.get("ADVANTAGE_TEST_MODEL_DIR")
    if override:
        return Path(override)
    from advantage.engine.models import resolve_model_path

    return resolve_model_path("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tokenizer(smollm_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(smollm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama (hidden 64) with SmolLM2's tokenizer and chat template: ~16 MB, fast."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(smollm_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for the engines a module starts (a thread reads the setting on its first op).

    On a shared two-core box, two OpenMP threads spin at every barrier whenever another process holds a
    core: a 1 s request then takes 15-50 s at random. One thread is slower on an idle box but steady.
    Use it with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
