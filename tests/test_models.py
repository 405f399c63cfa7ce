"""The bundled-model registry: unknown names are refused with the choices; directories must be HF dirs."""

from __future__ import annotations

from pathlib import Path

import pytest

from advantage.engine.models import BUNDLED, UnknownModelError, resolve_model_path


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(UnknownModelError) as err:
        resolve_model_path("gpt-17-ultra")
    for name in BUNDLED:
        assert name in str(err.value)
    assert "Hugging Face model directory" in str(err.value)


def test_directory_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match="config.json"):
        resolve_model_path(str(tmp_path))


def test_local_hf_dir_is_used_as_is(tiny_model_dir: Path) -> None:
    assert resolve_model_path(str(tiny_model_dir)) == tiny_model_dir


def test_bundled_model_converts_once_to_safetensors(smollm_dir: Path) -> None:
    assert (smollm_dir / "config.json").exists() and list(smollm_dir.glob("*.safetensors"))
    assert resolve_model_path("smollm2-135m-instruct") == smollm_dir  # cached: no second conversion
