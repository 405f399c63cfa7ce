"""The vocabulary head's matmul in each of its forms (`engine/head.py`), at the row counts a decode step has.

The bundled SmolLM2's head (49,152 x 576, fp32) as the engine holds it (column-major), torch's default threads.
Prints the milliseconds of one matmul per form and row count (median of `--repeats`) and the fastest form's
ratio to `F.linear` on the weight as held (what the engine did before it timed them); then the plan an
engine of 64 rows made here (`TorchEngine.head_plan`: each form from that many rows up).

    .venv/bin/python benchmarks/head_forms.py [--rows 1 8 24 48 64 96] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from advantage.engine.head import FORMS, time_forms  # noqa: E402
from advantage.engine.models import resolve_model_path  # noqa: E402
from advantage.engine.sampling import SamplingParams  # noqa: E402
from advantage.engine.torch_engine import TorchEngine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 24, 48, 64, 96])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    engine = TorchEngine(resolve_model_path("smollm2-135m-instruct"), head_form="linear")
    weight = engine.model.lm_head.weight.detach()
    print(
        f"head {tuple(weight.shape)} {weight.dtype}, stride {weight.stride()}, {torch.get_num_threads()} threads"
    )
    print("| rows | " + " | ".join(f"{f} (ms)" for f in FORMS) + " | fastest vs linear |")
    print("|---|" + "---|" * (len(FORMS) + 1))
    with torch.no_grad():
        for n in args.rows:
            ms = {k: v * 1e3 for k, v in time_forms(weight, n, args.repeats).items()}
            best = min(ms, key=ms.__getitem__)
            cells = " | ".join(f"{ms[f]:.1f}" if f in ms else "" for f in FORMS)
            print(f"| {n} | {cells} | {best} {ms['linear'] / ms[best]:.2f}x |", flush=True)
    engine.close()
    tuned = TorchEngine(resolve_model_path("smollm2-135m-instruct"), max_batch_size=64)
    tuned.submit([1, 2, 3], SamplingParams(max_tokens=1)).result()  # the plan is made before it runs
    print(f"an engine of 64 rows, head plan: {tuned.head_plan}")
    tuned.close()


if __name__ == "__main__":
    main()
