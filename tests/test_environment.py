"""`import advantage` changes no environment variable and loads no torch; the engine's defaults are set
where an engine starts (the CLI, LocalBackend), never over a value the user set."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from advantage.environment import ENGINE_DEFAULTS, set_engine_defaults

PROBE = """
import json, os, sys
seen = lambda: {name: os.environ.get(name) for name in ("OMP_WAIT_POLICY", "HF_HUB_OFFLINE")}
before = dict(os.environ)
import advantage
after_import = {**seen(), "torch": "torch" in sys.modules, "unchanged": dict(os.environ) == before}
import advantage.cli
print(json.dumps({"import": after_import, "cli": seen()}))
"""


def test_import_sets_nothing_and_the_cli_keeps_the_users_values() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ENGINE_DEFAULTS}
    env["OMP_WAIT_POLICY"] = "ACTIVE"  # the user's choice, which the CLI must keep
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["import"] == {
        "OMP_WAIT_POLICY": "ACTIVE",
        "HF_HUB_OFFLINE": None,
        "torch": False,
        "unchanged": True,  # no variable at all, not only these two
    }
    assert seen["cli"] == {"OMP_WAIT_POLICY": "ACTIVE", "HF_HUB_OFFLINE": "1"}


def test_engine_defaults_fill_only_what_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    set_engine_defaults()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and os.environ["HF_HUB_OFFLINE"] == "0"
