"""`advantage serve`'s options are the fields of `ServeConfig`: parsed by the CLI, checked by the config, run by
`advantage.server.runner.serve`. The run itself (a real server answering) is covered by test_hostile's and
test_ray_workers' subprocess tests; here the CLI hands the config on and stops before serving."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from advantage.cli import app
from advantage.server import runner
from advantage.server.config import ServeConfig


def _said(output: str) -> str:
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", output).split())  # rich's error box, unwrapped


def test_the_config_refuses_what_cannot_run() -> None:
    with pytest.raises(ValidationError, match="only the torch engine takes a thread count"):
        ServeConfig(engine="vllm", engine_threads=1)
    with pytest.raises(ValidationError, match="at least one base model"):
        ServeConfig(base_model=[])
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        ServeConfig(workers=2)  # type: ignore[call-arg]
    assert not ServeConfig().uses_ray and ServeConfig(engine_replicas=2).uses_ray
    assert "secret" not in repr(ServeConfig(api_key="secret"))  # a printed config does not leak the key


@pytest.fixture
def handed_on(monkeypatch: pytest.MonkeyPatch) -> list[ServeConfig]:
    """The configs `advantage serve` would serve, caught before it builds engines or listens."""
    seen: list[ServeConfig] = []

    def service_of(cfg: ServeConfig) -> object:
        seen.append(cfg)
        return object()

    monkeypatch.setattr(runner, "service_of", service_of)
    monkeypatch.setattr(runner, "serve_forever", lambda *a: None)
    return seen


def test_the_cli_hands_every_option_to_the_config(handed_on: list[ServeConfig], tmp_path: Path) -> None:
    args = ["serve", "--port", "7001", "--base-model", "a", "--base-model", "b", "--model-dir", str(tmp_path),
            "--record", "--background-samples", "3", "--engine-threads", "1", "--root", str(tmp_path / "r")]  # fmt: skip
    result = CliRunner().invoke(app, args, env={"ADVANTAGE_API_KEY": "k-from-env"})
    assert result.exit_code == 0, result.output
    (cfg,) = handed_on
    assert cfg.port == 7001 and cfg.base_model == ["a", "b"] and cfg.model_dir == [tmp_path]
    assert cfg.record and cfg.background_samples == 3 and cfg.engine_threads == 1
    assert cfg.root == tmp_path / "r" and cfg.api_key == "k-from-env"
    assert cfg.host == "127.0.0.1" and cfg.engine == "torch"  # defaults where nothing was given


def test_a_refused_option_is_a_usage_error_that_names_it(handed_on: list[ServeConfig]) -> None:
    result = CliRunner().invoke(app, ["serve", "--background-samples", "17"])
    assert result.exit_code == 2 and "--background-samples" in result.output
    assert "less than or equal to 16" in _said(result.output) and not handed_on


def test_a_base_model_that_does_not_exist_is_a_usage_error_not_a_traceback() -> None:
    result = CliRunner().invoke(app, ["serve", "--base-model", "/nowhere/model", "--port", "7002"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "Unknown base_model '/nowhere/model'" in _said(result.output)
