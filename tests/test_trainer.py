"""The trainer's primitives on the tiny random Llama: prefix sharing computes the same logprobs and the same
gradient as running every sequence in full, and one step really changes the adapter."""

from __future__ import annotations

import pytest
import torch

from advantage.config import AdamParams, LoRAConfig
from advantage.training.packing import shared_prefix_len
from advantage.training.trainer import Datum, Trainer


def _datums() -> list[Datum]:
    prompt = [1, 5, 9, 13, 17, 21, 25]
    comps = [[30, 31, 32, 2], [30, 40, 2], [50, 51, 52, 53, 54, 2]]
    return [
        Datum(
            input_ids=prompt + c,
            loss_mask=[0] * len(prompt) + [1] * len(c),
            logprobs=[0.0] * (len(prompt) + len(c)),
            advantage=adv,
        )
        for c, adv in zip(comps, [1.0, -0.5, -0.5], strict=True)
    ]


def test_shared_prefix_stops_before_first_trained_token() -> None:
    ds = _datums()
    # The completions share token 30 at position 7, but position 7 is trained: the prefix stops at 7.
    assert shared_prefix_len(ds) == 7
    assert shared_prefix_len([ds[0], Datum(input_ids=[9, 9], loss_mask=[0, 1])]) == 0


def _grads(trainer: Trainer, datums_list: list[list[Datum]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    trainer.model.zero_grad(set_to_none=True)
    lps = []
    for ds in datums_list:
        lp, P = trainer.sequence_logprobs(ds)
        for i, d in enumerate(ds):
            mask = torch.tensor(d.loss_mask[P:], dtype=torch.bool)
            lps.append(lp[i, : len(mask)][mask])
            (lp[i, : len(mask)][mask].sum() * d.advantage).backward(retain_graph=True)
    return lps, [p.grad.clone() for p in trainer.params if p.grad is not None]


def test_prefix_sharing_matches_full_sequences(tiny_model_dir) -> None:
    trainer = Trainer(tiny_model_dir, LoRAConfig(r=4), dtype="float32")
    for p in trainer.params:  # LoRA B starts at zero; give it values so every LoRA weight gets a gradient
        torch.nn.init.normal_(p, std=0.02)
    ds = _datums()
    shared_lp, shared_g = _grads(trainer, [ds])  # one call: prompt once, cache repeated 3x
    alone_lp, alone_g = _grads(trainer, [[d] for d in ds])  # each sequence on its own (no sharing across)
    for a, b in zip(shared_lp, alone_lp, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert len(shared_g) == len(alone_g) > 0
    for a, b in zip(shared_g, alone_g, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_forward_backward_and_optim_step_change_the_adapter(tiny_model_dir) -> None:
    trainer = Trainer(tiny_model_dir, LoRAConfig(r=4), dtype="float32")
    before = [p.detach().clone() for p in trainer.params]

    def loss_fn(b):
        loss = -(b.logp * b.adv[:, None] * b.mask).sum() / b.mask.sum()
        return loss, {"loss": float(loss.detach())}

    metrics, new_lp = trainer.forward_backward(_datums(), loss_fn)
    assert [len(x) for x in new_lp] == [11, 10, 13]  # aligned to input_ids
    assert [sum(v != 0.0 for v in x) for x in new_lp] == [4, 3, 6]  # values on the masked tokens only
    norm = trainer.optim_step(AdamParams(learning_rate=1e-2))
    assert norm > 0
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, trainer.params, strict=True))


def test_entropy_metric_is_the_policy_entropy_at_trained_tokens(tiny_model_dir) -> None:
    from advantage.training.primitives import forward_backward

    trainer = Trainer(tiny_model_dir, LoRAConfig(r=4), dtype="float32")
    ds = _datums()
    metrics, _ = forward_backward(trainer, ds, "cispo", micro_batch_size=2)
    # By hand: the full model's distribution at every position that predicts a trained token.
    want, n = 0.0, 0
    with torch.no_grad():
        for d in ds:
            ids = torch.tensor([d.input_ids], device=trainer.device)
            logits = trainer.model(input_ids=ids).logits[0].float().cpu()
            logp = torch.log_softmax(logits, -1)
            for j, m in enumerate(d.loss_mask):
                if m:
                    want += float(-(logp[j - 1].exp() * logp[j - 1]).sum())
                    n += 1
    torch.testing.assert_close(metrics["entropy"], want / n, atol=1e-4, rtol=1e-4)


def test_bf16_trainer_and_engine_head_run_in_fp32(tiny_model_dir) -> None:
    from advantage.engine.torch_engine import TorchEngine

    trainer = Trainer(tiny_model_dir, LoRAConfig(r=4), dtype="bfloat16")
    lp, _ = trainer.sequence_logprobs(_datums())
    assert lp.dtype == torch.float32
    head = trainer.model.get_base_model().lm_head
    assert head.weight.dtype == torch.float32
    engine = TorchEngine(tiny_model_dir, dtype="bfloat16")
    try:
        assert engine.model.lm_head.weight.dtype == torch.float32
        assert next(engine.model.model.layers.parameters()).dtype == torch.bfloat16  # decoder stays bf16
    finally:
        engine.close()


def test_auto_dtype_is_bf16_on_cuda_and_fp32_on_every_cpu(monkeypatch) -> None:
    from advantage.engine import precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv(precision.DTYPE_ENV)  # conftest sets it; this test is about "auto" without it
    assert precision.resolve_dtype("auto", cpu) == torch.float32  # with AMX too: precision.py says why
    assert precision.resolve_dtype("auto", cuda) == torch.bfloat16
    assert precision.resolve_dtype("bfloat16", cpu) == torch.bfloat16  # an explicit choice stands
    with pytest.raises(ValueError, match="dtype must be"):
        precision.resolve_dtype("fp8", cpu)


def test_advantage_dtype_overrides_auto(monkeypatch) -> None:
    from advantage.engine import precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setenv(precision.DTYPE_ENV, "bfloat16")
    assert precision.resolve_dtype("auto", cpu) == precision.resolve_dtype("auto", cuda) == torch.bfloat16
    monkeypatch.setenv(precision.DTYPE_ENV, "float32")
    assert precision.resolve_dtype("auto", cpu) == precision.resolve_dtype("auto", cuda) == torch.float32
    assert precision.resolve_dtype("bfloat16", cpu) == torch.bfloat16  # an explicit dtype still wins
    monkeypatch.setenv(precision.DTYPE_ENV, "fp32")
    with pytest.raises(ValueError, match="ADVANTAGE_DTYPE must be one of bfloat16, float32, float16"):
        precision.resolve_dtype("auto", cpu)


def _cispo_step(trainer: Trainer) -> None:
    from advantage.training.primitives import forward_backward

    forward_backward(trainer, _datums(), "cispo", micro_batch_size=2)
    trainer.optim_step(AdamParams(learning_rate=1e-2))


@pytest.mark.gpu
def test_cuda_trainer_matches_cpu_and_its_checkpoint_loads_on_cpu(tiny_model_dir, tmp_path) -> None:
    """The same step on CUDA and on the CPU (fp32) gives the same logprobs and adapter; a checkpoint written
    on CUDA (adapter and AdamW state) loads into a CPU trainer and continues the same way."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    gpu = Trainer(tiny_model_dir, LoRAConfig(r=4), dtype="float32", device="cuda")
    cpu = Trainer(tiny_model_dir, LoRAConfig(r=4), dtype="float32", device="cpu")
    assert gpu.device.type == "cuda" and next(gpu.model.parameters()).is_cuda
    for t in (gpu, cpu):
        _cispo_step(t)
    for a, b in zip(gpu.forward(_datums()), cpu.forward(_datums()), strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=0)
    gpu.save(tmp_path)
    moved = Trainer(tiny_model_dir, LoRAConfig(r=4), dtype="float32", device="cpu")
    moved.load(tmp_path)
    for t in (moved, gpu):
        _cispo_step(t)
    for a, b in zip(moved.params, gpu.params, strict=True):
        torch.testing.assert_close(a.detach(), b.detach().cpu(), atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradient(tiny_model_dir) -> None:
    """On: every decoder layer runs again in the backward pass, and no prompt prefix runs as a KV cache (HF's
    checkpointed layers drop it), yet the gradient is the one of the shared-prefix path with it off."""
    from helpers import dp_datums

    from advantage.training.primitives import forward_backward

    trainer = Trainer(tiny_model_dir, LoRAConfig(r=4), dtype="float32")
    for p in trainer.params:  # LoRA B starts at zero; give it values so every LoRA weight gets a gradient
        torch.nn.init.normal_(p, std=0.02)
    mlp_runs = []
    # a pre-hook: the recompute stops early, once it has what the backward needs (the hook at the end may not run)
    trainer.decoder.layers[0].mlp.register_forward_pre_hook(lambda *_: mlp_runs.append(1))

    def grads(on: bool) -> tuple[list[torch.Tensor], float, int]:
        trainer.model.zero_grad(set_to_none=True)
        mlp_runs.clear()
        with trainer.gradient_checkpointing(on):
            # 12 datums with one system prompt in 4 micro-batches: off, the prompt runs once (SharedPrefix)
            m, _ = forward_backward(trainer, dp_datums(), "cispo", micro_batch_size=4)
        assert trainer.checkpointing is False  # off again after the block
        assert m["micro_batches"] == 4
        return [p.grad.clone() for p in trainer.params], m["loss"], len(mlp_runs)

    off, loss_off, runs_off = grads(False)
    on, loss_on, runs_on = grads(True)
    assert runs_off == 1 + 4  # the shared prefix once, then each micro-batch's rows
    assert runs_on == 2 * 4  # each micro-batch's rows, and again in its backward pass
    assert loss_on == pytest.approx(loss_off, rel=1e-5)
    assert len(on) == len(trainer.params)
    for a, b in zip(on, off, strict=True):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-4)


def test_a_shared_prefix_is_refused_under_gradient_checkpointing(tiny_model_dir) -> None:
    from advantage.training.trainer import SharedPrefix

    trainer = Trainer(tiny_model_dir, LoRAConfig(r=4), dtype="float32")
    ds = _datums()
    prefix = SharedPrefix(trainer, ds[0].input_ids[:7])
    with trainer.gradient_checkpointing(), pytest.raises(ValueError, match="gradient checkpointing drops"):
        trainer.sequence_logprobs(ds, prefix=prefix)


def test_train_step_honours_the_configs_gradient_checkpointing(tiny_model_dir, monkeypatch) -> None:
    from advantage.config import TrainConfig
    from advantage.training import grpo

    trainer = Trainer(tiny_model_dir, LoRAConfig(r=4), dtype="float32")
    seen = []

    def fake_forward_backward(t, datums, *args, **kwargs):
        seen.append(t.checkpointing)
        raise RuntimeError("stop here")

    monkeypatch.setattr(grpo, "forward_backward", fake_forward_backward)
    monkeypatch.setattr(grpo, "step_datums", lambda *a: (_datums(), {}, None))
    for on in (True, False):
        with pytest.raises(RuntimeError, match="stop here"):
            grpo.train_step(trainer, [], TrainConfig(gradient_checkpointing=on))
        assert trainer.checkpointing is False
    assert seen == [True, False]
    embed = trainer.model.get_base_model().get_input_embeddings()
    assert not embed._forward_hooks  # the input-grad hook HF adds on enabling is not left behind


def test_the_adapter_starts_from_its_seed_whatever_the_global_generator_did(
    tiny_model_dir, monkeypatch
) -> None:
    """The LoRA's first weights come from the trainer's seed alone, and are the ones peft draws under
    `torch.manual_seed(seed)`: an engine sampling on another thread while a trainer is built (it moves the
    global generator) must not change where training starts."""
    import peft
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lora = LoRAConfig()

    def adapter(trainer: Trainer) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in trainer.model.named_parameters() if "lora_" in k}

    torch.manual_seed(123)
    first = adapter(Trainer(tiny_model_dir, lora, seed=3))
    real = peft.get_peft_model

    def another_thread_samples_first(*args, **kwargs):  # as an engine thread drawing a token in between
        torch.rand(1000)
        return real(*args, **kwargs)

    monkeypatch.setattr(peft, "get_peft_model", another_thread_samples_first)
    second = adapter(Trainer(tiny_model_dir, lora, seed=3))
    monkeypatch.undo()
    other = adapter(Trainer(tiny_model_dir, lora, seed=4))
    torch.manual_seed(3)  # what peft gave a trainer of seed 3 when the trainer seeded the global generator
    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                     target_modules=lora.target_modules, task_type="CAUSAL_LM")  # fmt: skip
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), cfg)
    expected = {k: v.detach() for k, v in peft_model.named_parameters() if "lora_" in k}
    assert first.keys() == expected.keys() and any("lora_A" in k for k in first)
    for k, v in expected.items():
        assert torch.equal(first[k], second[k]) and torch.equal(first[k], v), k
    assert any(not torch.equal(first[k], other[k]) for k in first if "lora_A" in k)
