"""The process environment the engine wants, set where an engine starts (LocalBackend, the `advantage`
command) and never on `import advantage`.

- `OMP_WAIT_POLICY=PASSIVE`: the engine and the trainer run torch on their own threads, and with OpenMP's
  default spin-waiting the idle worker pool of one burns the cores the other needs (measured: 10x slower
  batch-1 decoding on 2 cores, BENCHMARKS.md). OpenMP reads it once, when torch loads, so it only takes
  effect if it is set before the process's first `import torch`.
- `HF_HUB_OFFLINE=1`: models load from local directories (the bundled ones are converted once into a
  cache); nothing is fetched from a model hub.

Both are set with `os.environ.setdefault`: a value the user set, "0" and "ACTIVE" included, is kept.
"""

from __future__ import annotations

import os

ENGINE_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}


def set_engine_defaults() -> None:
    """Set each of ENGINE_DEFAULTS that the environment does not already have."""
    for name, value in ENGINE_DEFAULTS.items():
        os.environ.setdefault(name, value)
