"""The Ray cluster that trainer workers (`training/ray_workers.py`) and engine replicas (`engine/replicas.py`)
share: joined at an address, or started on this machine and shut down when the last of its users leaves.

A user is whatever holds actors on it (a trainer group, an engine's replicas, a `LocalBackend` that sized the
cluster for both). A cluster that was up before the first `join` (a test's, a caller's own `ray.init`) is
never shut down here. Ray is imported only inside these functions.
"""

from __future__ import annotations

import math
import os

# Users of a local cluster that `join` started; the last one to `leave` shuts it down.
_local_users: list[object] = []


def join(ray_address: str | None, cpus: float, user: object) -> None:
    """Have Ray initialized for `user`: the cluster already up, else the one at `ray_address`, else a new local
    one declaring `cpus` logical CPUs (this machine's core count if that is more). ImportError saying how to
    install Ray when it is missing."""
    try:
        import ray
    except ImportError as e:
        raise ImportError(
            "Trainer workers, engine replicas or a Ray address need Ray, an optional extra: "
            "pip install 'advantage[ray]'. Without them everything runs in this process."
        ) from e
    if ray.is_initialized():
        if _local_users:  # a local cluster started here: one more user keeps it up
            _local_users.append(user)
        return
    if ray_address is None:
        num_cpus = max(os.cpu_count() or 1, math.ceil(cpus))
        ray.init(num_cpus=num_cpus, include_dashboard=False, configure_logging=False)
        _local_users.append(user)
    else:
        ray.init(address=ray_address, configure_logging=False)


def leave(user: object) -> None:
    """`user` holds nothing on the cluster any more; a local cluster started here stops with its last user."""
    if user in _local_users:
        _local_users.remove(user)
        if not _local_users:
            import ray

            ray.shutdown()
