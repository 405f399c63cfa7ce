"""torch's intra-op thread count, set for the calling thread and kept."""

from __future__ import annotations

import torch


def set_torch_threads(n: int) -> None:
    """Set torch's intra-op thread count for the calling thread, for good.

    torch keeps the count per thread, but sets a thread's count lazily, at its first parallel op (or
    `get_num_threads()`), to the last count set on *any* thread, and that overwrites a count set before it.
    Reading the count first settles that, so `n` stays. Found when the engine dropped to one thread while
    a training step started: the training thread had set 2 but had run no op yet, so it took the engine's 1
    and kept it, and every later update ran on one core (1.4-1.7x slower)."""
    torch.get_num_threads()
    torch.set_num_threads(n)
