"""Which engine replica a request goes to: prefix affinity, else the least loaded (`engine/replicas.py`).

A replica's prefix cache holds the KV states of the prompts it served. Two kinds of request reuse them:
the rollouts of one GRPO group (the same prompt) and the next turn of one rollout (the previous turn's
prompt, the reply and the tool result: the previous prompt is a prefix of the new one). So a request goes to
the live replica that most recently served a prompt which is a prefix of its own (the longest such prompt);
when there is none, to the live replica with the fewest requests in flight (ties: the lowest index).

A shared system prompt alone does not count: two groups whose prompts share only their start (the system
prompt and tool schemas) are spread over the replicas by load, since no earlier prompt is a prefix of the
other. A replica that holds a prefix gets its requests however busy it is (the rollouts of a group are
batched together there, one prefill for all).

Prompts are remembered by the chained hash of their whole 32-token blocks (the bucket), with the prompt's
length and the hash of all its tokens inside the bucket; finding the prompts that prefix a new one costs one
dict lookup per block of it and one tuple hash per candidate. The last 4,096 buckets are kept, and each
keeps its last 16 prompts (prompts shorter than a block share one bucket).
"""

from __future__ import annotations

from collections import OrderedDict

BLOCK = 32  # tokens per hashed block
REMEMBER = 4096  # buckets kept (least recently used dropped)
PER_BUCKET = 16  # prompts kept per bucket


class PrefixRouter:
    """Pure routing state: no Ray, no engine. `route` picks a replica and remembers the prompt there."""

    def __init__(self, block: int = BLOCK, remember: int = REMEMBER) -> None:
        self.block, self.remember = block, remember
        # bucket (chained hash of the whole blocks) -> {(prompt length, hash of the prompt): replica}
        self._buckets: OrderedDict[int, OrderedDict[tuple[int, int], int]] = OrderedDict()

    def _chain(self, prompt: list[int]) -> list[int]:
        """The bucket keys of prompt[: i * block] for i = 0 .. len(prompt) // block."""
        keys, h = [0], 0
        for i in range(len(prompt) // self.block):
            h = hash((h, tuple(prompt[i * self.block : (i + 1) * self.block])))
            keys.append(h)
        return keys

    def affine(self, prompt: list[int], live: set[int]) -> int | None:
        """The live replica that served the longest earlier prompt that is a prefix of `prompt`, if any."""
        chain = self._chain(prompt)
        for key in reversed(chain):  # longest bucket first; within it the longest matching prompt
            bucket = self._buckets.get(key)
            if not bucket:
                continue
            for (length, full), replica in sorted(bucket.items(), key=lambda kv: -kv[0][0]):
                if replica in live and length <= len(prompt) and hash(tuple(prompt[:length])) == full:
                    return replica
        return None

    def route(self, prompt: list[int], load: dict[int, int]) -> int:
        """The replica for `prompt`, given each live replica's requests in flight; remembered for the next."""
        if not load:
            raise ValueError("no live replica to route to")
        replica = self.affine(prompt, set(load))
        if replica is None:
            replica = min(load, key=lambda r: (load[r], r))
        self.record(prompt, replica)
        return replica

    def record(self, prompt: list[int], replica: int) -> None:
        key = self._chain(prompt)[-1]
        bucket = self._buckets.pop(key, None) or OrderedDict()
        entry = (len(prompt), hash(tuple(prompt)))
        bucket.pop(entry, None)
        bucket[entry] = replica
        while len(bucket) > PER_BUCKET:
            bucket.popitem(last=False)
        self._buckets[key] = bucket  # most recently used last
        while len(self._buckets) > self.remember:
            self._buckets.popitem(last=False)

    def forget(self, replica: int) -> None:
        """A replica restarted: its prefix cache is empty, so nothing is affine to it any more."""
        for bucket in self._buckets.values():
            for entry in [e for e, r in bucket.items() if r == replica]:
                del bucket[entry]
