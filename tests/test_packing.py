"""Suffix packing in the trainer: several completions of one prompt share a row (block-causal 4D mask) and
give the same logprobs and gradients as one row per sequence; the packing metric counts what really runs."""

from __future__ import annotations

import torch

from advantage.config import LoRAConfig
from advantage.training import primitives
from advantage.training.packing import pack_rows
from advantage.training.trainer import Datum, Trainer


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
        Datum(
            input_ids=prompt + c,
            loss_mask=[0] * len(prompt) + [1] * len(c),
            logprobs=[-1.0] * (len(prompt) + len(c)),
            advantage=adv,
        )
        for c, adv in zip(comps, [1.0, -0.5, 0.25, -0.75], strict=True)
    ]


def _run(trainer: Trainer, datums: list[Datum]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    trainer.model.zero_grad(set_to_none=True)
    lp_BS, P = trainer.sequence_logprobs(datums)
    adv_B = torch.tensor([d.advantage for d in datums], device=trainer.device)
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
        return Datum(input_ids=prompt + [9], loss_mask=[0] * len(prompt) + [1])

    sys_a, sys_b = [1, 2, 3], [7, 7]
    datums = [datum(sys_b + [5])] * 3 + [datum(sys_a + [4])] * 3 + [datum(sys_a + [3])] * 2
    # Sorted prompts: sys_a+[3] (idx 6, 7), sys_a+[4] (3..5), sys_b+[5] (0..2).
    assert micro_batches(datums, 8) == [[6, 7, 3, 4, 5, 0, 1, 2]]
    assert micro_batches(datums, 7) == [[6, 7, 3, 4, 5], [0, 1, 2]]  # the third group would not fit whole
    assert micro_batches(datums, 2) == [[6, 7], [3, 4], [5], [0, 1], [2]]
    assert sorted(i for c in micro_batches(datums, 3) for i in c) == list(range(8))


def _tree_datums() -> list[Datum]:
    """Three prompts with a common start [1, 5, 9]: two groups of completions and a lone one; one completion
    is multi-turn (a masked tool result in the middle of its trained tokens)."""
    system = [1, 5, 9]
    prompts = [system + [13, 17], system + [21], system + [25, 29, 33, 37]]
    comps = [
        (0, [50, 51, 2], [1, 1, 1]),
        (0, [30, 2], [1, 1]),
        (0, [60, 61, 62, 63, 64, 65, 2], [1, 1, 0, 0, 1, 1, 1]),  # tokens 62-63: a tool result, not trained
        (1, [40, 41, 42, 43], [1, 1, 1, 1]),
        (1, [44], [1]),
        (2, [70, 71], [1, 1]),
    ]
    return [
        Datum(
            input_ids=prompts[g] + c,
            loss_mask=[0] * len(prompts[g]) + m,
            logprobs=[-1.0] * (len(prompts[g]) + len(c)),
            advantage=0.3 * (k - 2),
        )
        for k, (g, c, m) in enumerate(comps)
    ]


def _alone(trainer: Trainer, datums: list[Datum]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The plain computation: each sequence in its own forward pass, over its full length."""
    trainer.model.zero_grad(set_to_none=True)
    lps = []
    for d in datums:
        lp, P = trainer.sequence_logprobs([d])
        lp_full = torch.cat([torch.zeros(P, device=trainer.device), lp[0]])
        (lp_full.sum() * d.advantage).backward()
        lps.append(lp_full.detach())
    return lps, [p.grad.clone() for p in trainer.params if p.grad is not None]


def test_tree_layout_runs_each_prompt_once_and_matches_full_sequences(tiny_model_dir, monkeypatch) -> None:
    from advantage.training import packing

    trainer = Trainer(tiny_model_dir, LoRAConfig(r=4), dtype="float32")
    for p in trainer.params:
        torch.nn.init.normal_(p, std=0.02)
    ds = _tree_datums()
    lay = packing.layout(ds, packing.shared_prefix_len(ds), trainer.pad_id)
    # The common [1, 5, 9] once (3); each prompt's rest once (2 + 1 + 4); completions 3+2+7+4+1+2 = 19.
    assert lay.real_tokens == 3 + 7 + 19
    alone_lp, alone_g = _alone(trainer, ds)
    for row_tokens in (packing.ROW_TOKENS, 4):  # 4: a group's completions split over rows, parent repeated
        monkeypatch.setattr(packing, "ROW_TOKENS", row_tokens)
        packed_lp, packed_g = _run(trainer, ds)
        P = packing.shared_prefix_len(ds)
        for i, d in enumerate(ds):
            full = torch.cat([torch.zeros(P, device=trainer.device), packed_lp[i, : len(d.input_ids) - P]])
            torch.testing.assert_close(full, alone_lp[i], atol=1e-5, rtol=1e-4)
        assert (packed_lp != 0).sum() == sum(sum(d.loss_mask) for d in ds)
        for a, b in zip(packed_g, alone_g, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_tree_layout_masks_and_positions_by_hand() -> None:
    from advantage.training.packing import layout

    # Shared prefix [1] (P = 1). Group A: rest [2], completions [3, 4] and [5]; group B: rest [6, 7], [8].
    ds = [
        Datum(input_ids=[1, 2, 3, 4], loss_mask=[0, 0, 1, 1]),
        Datum(input_ids=[1, 2, 5], loss_mask=[0, 0, 1]),
        Datum(input_ids=[1, 6, 7, 8], loss_mask=[0, 0, 0, 1]),
    ]
    lay = layout(ds, 1, pad_id=0)
    # Blocks: A = [2 | 3 4 | 5] (4 slots), B = [6 7 | 8] (3 slots): two rows of 4 slots.
    assert lay.ids_RS.tolist() == [[2, 3, 4, 5], [6, 7, 8, 0]]
    assert lay.pos_RS.tolist() == [[1, 2, 3, 2], [1, 2, 3, 1]]
    # Row 0 keys: prefix, then slots 0..3. Completion [5] (slot 3) sees the prefix, its parent, itself.
    assert lay.see_RSK[0].int().tolist() == [
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 0, 0, 1],
    ]
    # Datum 0's suffix [2, 3, 4]: token 3 predicted by slot 0 (flat 0, +1), token 4 by slot 1 (+1 = 2).
    assert lay.pick_BS[0].tolist()[1:3] == [1, 2]
    assert lay.pick_BS[1].tolist()[1] == 1  # [5]'s first token: also the parent's last slot
    assert lay.pick_BS[2].tolist()[2] == 4 + 1 + 1  # [8]: predicted by row 1 slot 1 (flat 5, +1)
    assert (lay.real_tokens, lay.slot_tokens) == (1 + 7, 1 + 8)


def test_prefix_shared_across_micro_batches_gives_the_same_gradient(tiny_model_dir) -> None:
    """Micro-batches of one or two groups: the batch-wide [1, 5, 9] runs once for all of them (one decoder
    call, plus one per micro-batch) and the gradient equals the one from a single micro-batch."""
    trainer = Trainer(tiny_model_dir, LoRAConfig(r=4), dtype="float32")
    for p in trainer.params:
        torch.nn.init.normal_(p, std=0.02)
    ds = _tree_datums()
    calls = []
    hook = trainer.decoder.register_forward_pre_hook(lambda _m, _a: calls.append(1))

    def grads(micro_batch_size: int) -> tuple[dict[str, float], list[list[float]], list[torch.Tensor]]:
        trainer.model.zero_grad(set_to_none=True)
        calls.clear()
        m, lps = primitives.forward_backward(trainer, ds, "cispo", micro_batch_size=micro_batch_size)
        return m, lps, [p.grad.clone() for p in trainer.params]

    one_m, one_lp, one_g = grads(64)
    assert len(calls) == 2  # the shared prefix, then the rows
    split_m, split_lp, split_g = grads(2)
    assert split_m["micro_batches"] == 4 and len(calls) == 1 + 4
    for a, b in zip(split_lp, one_lp, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=1e-4)
    for a, b in zip(split_g, one_g, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert abs(split_m["loss"] - one_m["loss"]) < 1e-5
    hook.remove()
