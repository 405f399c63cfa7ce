"""Suffix packing in the trainer: several completions of one prompt share a row (block-causal 4D mask) and
give the same logprobs and gradients as one row per sequence; the packing metric counts what really runs."""

from __future__ import annotations

import torch

from advantage.config import LoRAConfig
from advantage.training import primitives
from advantage.training.trainer import Datum, Trainer, pack_rows


def test_pack_rows_first_fit_longest_first() -> None:
    # capacity 6, longest first: 6 fills row 0; 4 opens row 1; 3 fits neither (6+3, 4+3) and opens row 2;
    # 2 fills row 1 (4+2); 1 joins row 2 (3+1). 16 tokens in 3 rows of 6, the least possible.
    assert pack_rows([3, 6, 2, 4, 1], 6) == [[1], [3, 2], [0, 4]]
    assert pack_rows([5, 5], 5) == [[0], [1]]
    assert pack_rows([], 4) == []


def _datums() -> list[Datum]:
    prompt = [1, 5, 9, 13, 17, 21, 25]
    comps = [[50, 51, 52, 53, 54, 2], [30, 31, 2], [30, 40], [60]]  # rows of 6: [6], [3, 2, 1]
    return [
        Datum(prompt + c, [0] * len(prompt) + [1] * len(c), [-1.0] * (len(prompt) + len(c)), adv)
        for c, adv in zip(comps, [1.0, -0.5, 0.25, -0.75], strict=True)
    ]


def _run(trainer: Trainer, datums: list[Datum]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    trainer.model.zero_grad(set_to_none=True)
    lp_BS, P = trainer.sequence_logprobs(datums)
    adv_B = torch.tensor([d.advantage for d in datums])
    (lp_BS.sum(dim=1) * adv_B).sum().backward()
    return lp_BS.detach(), [p.grad.clone() for p in trainer.params if p.grad is not None]


def test_packed_rows_match_one_row_per_sequence(tiny_model_dir) -> None:
    trainer = Trainer(tiny_model_dir, LoRAConfig(r=4), dtype="float32")
    for p in trainer.params:  # LoRA B starts at zero; give it values so every LoRA weight gets a gradient
        torch.nn.init.normal_(p, std=0.02)
    ds = _datums()
    packed_lp, packed_g = _run(trainer, ds)
    trainer.pack_suffixes = False
    rows_lp, rows_g = _run(trainer, ds)
    torch.testing.assert_close(packed_lp, rows_lp, atol=1e-5, rtol=1e-4)
    assert (packed_lp != 0).sum() == 6 + 3 + 2 + 1  # every trained token got a logprob
    assert len(packed_g) == len(rows_g) > 0
    for a, b in zip(packed_g, rows_g, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_packing_efficiency_counts_the_shared_prompt_once(tiny_model_dir) -> None:
    trainer = Trainer(tiny_model_dir, LoRAConfig(r=4), dtype="float32")
    ds = _datums()
    metrics, _ = primitives.forward_backward(trainer, ds, "cispo")
    # prompt 7 runs once; suffixes 6+3+2+1 = 12 in 2 rows of 6 = 12 slots: (7 + 12) / (7 + 12) = 1
    assert metrics["packing_efficiency"] == 1.0
    trainer.pack_suffixes = False
    metrics, _ = primitives.forward_backward(trainer, ds, "cispo")
    # one row per sequence: (7 + 12) / (7 + 4 * 6) = 19 / 31
    assert abs(metrics["packing_efficiency"] - 19 / 31) < 1e-9


def test_micro_batches_keep_groups_whole_and_neighbours_together():
    from advantage.training.primitives import micro_batches

    def datum(prompt: list[int]) -> Datum:
        return Datum(prompt + [9], [0] * len(prompt) + [1])

    sys_a, sys_b = [1, 2, 3], [7, 7]
    datums = [datum(sys_b + [5])] * 3 + [datum(sys_a + [4])] * 3 + [datum(sys_a + [3])] * 2
    # Sorted prompts: sys_a+[3] (idx 6, 7), sys_a+[4] (3..5), sys_b+[5] (0..2).
    assert micro_batches(datums, 8) == [[6, 7, 3, 4, 5, 0, 1, 2]]
    assert micro_batches(datums, 7) == [[6, 7, 3, 4, 5], [0, 1, 2]]  # the third group would not fit whole
    assert micro_batches(datums, 2) == [[6, 7], [3, 4], [5], [0, 1], [2]]
    assert sorted(i for c in micro_batches(datums, 3) for i in c) == list(range(8))
