"""One copy of the base weights per process (engine/weights.py): a registered model's trainer builds on its
engine's tensors, training writes only the adapter, and the engine's base answers stay the same."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from advantage.config import AdamParams, LoRAConfig
from advantage.engine.sampling import SamplingParams
from advantage.engine.torch_engine import TorchEngine
from advantage.service import Service
from advantage.training.primitives import forward_backward
from advantage.training.trainer import Datum, Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEQ = [1, 5, 9, 13, 17, 21, 25, 30, 31, 32, 2]


def _datums() -> list[Datum]:
    prompt = [1, 5, 9, 13, 17, 21, 25]
    comps = [[30, 31, 32, 2], [30, 40, 2], [50, 51, 52, 53, 54, 2]]
    return [
        Datum(
            input_ids=prompt + c,
            loss_mask=[0] * len(prompt) + [1] * len(c),
            logprobs=[-2.0] * (len(prompt) + len(c)),
            advantage=adv,
        )
        for c, adv in zip(comps, [1.0, -0.5, -0.5], strict=True)
    ]


def _frozen(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The trainer's base tensors by their name in the plain model (peft's wrapping taken off)."""
    base = trainer.model.get_base_model()
    named = [*base.named_parameters(remove_duplicate=False), *base.named_buffers(remove_duplicate=False)]
    return {n.replace(".base_layer", ""): t for n, t in named if "lora_" not in n}


def _assert_shared(trainer: Trainer, engine: TorchEngine) -> None:
    assert trainer.shares_base
    frozen = _frozen(trainer)
    shared = engine.base_weights.tensors
    assert frozen.keys() == shared.keys()
    for name, t in frozen.items():  # every frozen tensor is the engine's own storage
        assert t.data_ptr() == shared[name].data_ptr(), name
        assert not t.requires_grad, name


def test_a_registered_model_holds_one_copy_of_the_base_weights(tiny_model_dir: Path, tmp_path) -> None:
    service = Service(tmp_path, engine_kwargs={"max_context": 256}, share_base_weights=True)
    try:
        service.register("p", "m", str(tiny_model_dir))
        engine = service.engine(str(tiny_model_dir))
        trainer = service.model_entry("m").trainer
        assert isinstance(engine, TorchEngine) and isinstance(trainer, Trainer)
        _assert_shared(trainer, engine)
    finally:
        service.close()


def test_a_bf16_trainer_shares_the_engines_fp32_head_too(tiny_model_dir: Path) -> None:
    engine = TorchEngine(tiny_model_dir, dtype="bfloat16")
    try:
        trainer = Trainer(tiny_model_dir, LoRAConfig(r=4), dtype="bfloat16", base_weights=engine.base_weights)
        _assert_shared(trainer, engine)
        head = trainer.model.get_base_model().lm_head.weight
        assert head.dtype == torch.float32 and head.data_ptr() == engine.model.lm_head.weight.data_ptr()
    finally:
        engine.close()


@pytest.mark.parametrize("merge_lora", [True, False])  # the engine's merged adapters, and peft's layers
def test_a_step_writes_only_the_adapter_and_the_served_base_is_unchanged(
    tiny_model_dir: Path, tmp_path, merge_lora: bool
) -> None:
    service = Service(
        tmp_path, engine_kwargs={"dtype": "float32", "merge_lora": merge_lora}, share_base_weights=True
    )
    try:
        service.register("p", "m", str(tiny_model_dir))
        engine = service.engine(str(tiny_model_dir))
        trainer = service.model_entry("m").trainer
        assert isinstance(engine, TorchEngine) and isinstance(trainer, Trainer) and trainer.shares_base
        base_before = {n: t.clone() for n, t in engine.base_weights.tensors.items()}
        lora_before = [p.detach().clone() for p in trainer.params]
        scores_before = engine.score([SEQ]).result().logprobs
        greedy = SamplingParams(max_tokens=8, temperature=0.0)
        answer_before = engine.submit(SEQ[:7], greedy).result()[0].token_ids

        for _ in range(2):  # the second step moves LoRA A too (its gradient is 0 while B is 0)
            forward_backward(trainer, _datums(), "cispo", micro_batch_size=2)
            trainer.optim_step(AdamParams(learning_rate=0.05))
        out = tmp_path / "step1"
        out.mkdir()
        trainer.save(out)
        service.publish_step("m", 1, out)
        trained = engine.score([SEQ], adapter="m@1").result().logprobs
        engine.submit(SEQ[:7], greedy, adapter="m@1").result()  # a batch runs with the adapter in

        assert all(not torch.equal(a, p) for a, p in zip(lora_before, trainer.params, strict=True))
        assert trained != scores_before  # the adapter changes the answers...
        for name, t in engine.base_weights.tensors.items():  # ...and never the base weights
            assert torch.equal(t, base_before[name]), name
        assert (
            engine.score([SEQ]).result().logprobs == scores_before
        )  # the base, served again, answers as before
        assert engine.submit(SEQ[:7], greedy).result()[0].token_ids == answer_before
    finally:
        service.close()


def test_weights_of_another_dtype_are_not_shared_and_a_copy_is_loaded(tiny_model_dir: Path) -> None:
    engine = TorchEngine(tiny_model_dir, dtype="float32")
    try:
        trainer = Trainer(tiny_model_dir, LoRAConfig(r=4), dtype="bfloat16", base_weights=engine.base_weights)
        assert not trainer.shares_base
        shared = {t.data_ptr() for t in engine.base_weights.tensors.values()}
        assert all(t.data_ptr() not in shared for t in _frozen(trainer).values())
        assert next(iter(_frozen(trainer).values())).dtype == torch.bfloat16
    finally:
        engine.close()


def test_a_shared_trainer_trains_bit_for_bit_as_a_loaded_one(tiny_model_dir: Path) -> None:
    """Sharing changes where the base weights live, not one bit of a step: the loaded copy is laid out as the
    engine's (column-major linears on the CPU), so the matmuls sum in the same order. With the loaded copy
    left row-major the gradients differed by ~1e-6, and over a few Adam steps at lr 5e-2 that grew into
    another run (another teacher in `tests/test_distill.py`)."""
    engine = TorchEngine(tiny_model_dir, dtype="float32")
    try:
        shared = Trainer(tiny_model_dir, LoRAConfig(r=4), dtype="float32", base_weights=engine.base_weights)
        loaded = Trainer(tiny_model_dir, LoRAConfig(r=4), dtype="float32")
        assert shared.shares_base and not loaded.shares_base
        for a, b in zip(shared.params, loaded.params, strict=True):  # one seed: the same adapter's start
            assert torch.equal(a, b)
        for _ in range(3):  # the second step moves LoRA A too (its gradient is 0 while B is 0)
            metrics = [
                forward_backward(t, _datums(), "cispo", micro_batch_size=2)[0] for t in (shared, loaded)
            ]
            assert metrics[0]["loss"] == metrics[1]["loss"]
            for a, b in zip(shared.params, loaded.params, strict=True):
                assert a.grad is not None and b.grad is not None and torch.equal(a.grad, b.grad)
            for t in (shared, loaded):
                t.optim_step(AdamParams(learning_rate=0.05))
        for a, b in zip(shared.params, loaded.params, strict=True):
            assert torch.equal(a, b)
        assert shared.forward(_datums()) == loaded.forward(_datums())
    finally:
        engine.close()


def test_the_engine_keeps_no_view_of_the_mapped_checkpoint(tiny_model_dir: Path, tmp_path) -> None:
    """A tensor left on the mapped safetensors file keeps every page of it that was read resident."""
    import gc
    import shutil

    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    engine = TorchEngine(copy, dtype="float32")
    try:
        gc.collect()
        maps = Path("/proc/self/maps").read_text()
        assert str(copy / "model.safetensors") not in maps
    finally:
        engine.close()


def test_the_trainer_takes_the_engines_dtype_not_its_own_auto(
    tiny_model_dir: Path, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An engine asked for fp32 where "auto" means bf16 (here: ADVANTAGE_DTYPE; on a GPU: CUDA's default) gets
    an fp32 trainer that shares its weights, not a bf16 one that loads its own copy."""
    monkeypatch.setenv("ADVANTAGE_DTYPE", "bfloat16")
    service = Service(tmp_path, engine_kwargs={"dtype": "float32"}, share_base_weights=True)
    try:
        service.register("p", "m", str(tiny_model_dir))
        trainer = service.model_entry("m").trainer
        assert isinstance(trainer, Trainer) and trainer.shares_base
        assert next(iter(_frozen(trainer).values())).dtype == torch.float32
    finally:
        service.close()
