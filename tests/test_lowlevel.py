"""The low-level API (Tinker-style) on the tiny random Llama through real servers on 127.0.0.1:
forward_backward + optim_step with "cispo" is `model.train`, a custom loss gives the same update as the
built-in one and the same update locally and remotely, save_weights is served at once, and bad input is a
clear error. SFT on the real bundled model is in test_sft.py."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import torch
from helpers import PROMPT, toy_rollout

import advantage as adv
from advantage.backends.remote import BackendRequestError
from advantage.server.runner import BackgroundServer
from advantage.service import Service
from advantage.wire.ops import DatumsRequest

pytestmark = pytest.mark.integration
KEY = "k"
LR = 5e-2


@pytest.fixture
async def local(tmp_path: Path) -> AsyncIterator[adv.LocalBackend]:
    backend = adv.LocalBackend(tmp_path / "local", progress=False)
    yield backend
    await backend.close()


@pytest.fixture
def remote_service(tmp_path: Path) -> Iterator[Service]:
    service = Service(tmp_path / "remote")
    yield service
    service.close()


@pytest.fixture
async def remote(remote_service: Service) -> AsyncIterator[adv.RemoteBackend]:
    server = BackgroundServer(remote_service, api_key=KEY).start()
    backend = adv.RemoteBackend(server.base_url, api_key=KEY, progress=False)
    yield backend
    await backend.close()
    server.stop()


async def _model(backend: adv.Backend, name: str, tiny: Path) -> adv.TrainableModel:
    model = adv.TrainableModel(name, project="ll", base_model=str(tiny))
    await model.register(backend)
    return model


def _params(service: Service, name: str) -> list[torch.Tensor]:
    _, trainer = service.trainable(name)
    return [p.detach().clone() for p in trainer.params]


def _assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


async def _batch(model: adv.TrainableModel) -> list[adv.Datum]:
    groups = await adv.gather_trajectory_groups(
        [[toy_rollout(model) for _ in range(4)] for _ in range(2)], progress=False
    )
    tc = await model.training_client()
    datums = await tc.datums_from_groups(groups)
    assert datums and all(d.n_trained > 0 and d.logprobs is not None for d in datums)
    return datums


async def test_cispo_primitives_equal_model_train(local: adv.LocalBackend, tiny_model_dir: Path) -> None:
    a = await _model(local, "a", tiny_model_dir)
    b = await _model(local, "b", tiny_model_dir)
    groups = await adv.gather_trajectory_groups(
        [[toy_rollout(a) for _ in range(4)] for _ in range(2)], progress=False
    )
    config = adv.TrainConfig(learning_rate=LR)
    result = await a.train(groups, config)

    tc = await b.training_client()
    datums = await tc.datums_from_groups(groups, config)
    out = await tc.forward_backward(datums, "cispo")
    stepped = await tc.optim_step(
        adv.AdamParams(learning_rate=LR, betas=config.betas, max_grad_norm=config.max_grad_norm)
    )
    assert await tc.save_weights() == "b@1" and b.get_inference_name() == "b@1"

    _assert_same(_params(local.service, "a"), _params(local.service, "b"))
    fresh = _params(local.service, (await _model(local, "fresh", tiny_model_dir)).name)
    assert any(not torch.allclose(x, y) for x, y in zip(fresh, _params(local.service, "a"), strict=True))
    assert out.metrics["loss"] == pytest.approx(result.metrics["loss"], rel=1e-5)
    assert stepped["grad_norm"] == pytest.approx(result.metrics["grad_norm"], rel=1e-5)
    assert [len(lp) for lp in out.logprobs] == [len(d.input_ids) for d in datums]


def _custom_cross_entropy(datums: list[adv.Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
    masks = [torch.tensor(d.loss_mask) for d in datums]
    total = sum(m.sum() for m in masks)
    loss = -sum((lp * m).sum() for lp, m in zip(logprobs, masks, strict=True)) / total
    return loss, {"custom": 1.0}


async def test_custom_loss_equals_builtin(local: adv.LocalBackend, tiny_model_dir: Path) -> None:
    builtin = await _model(local, "builtin", tiny_model_dir)
    custom = await _model(local, "custom", tiny_model_dir)
    datums = await _batch(builtin)
    tc_b, tc_c = await builtin.training_client(), await custom.training_client()
    out_b = await tc_b.forward_backward(datums, "cross_entropy", micro_batch_size=3)
    out_c = await tc_c.forward_backward(datums, _custom_cross_entropy, micro_batch_size=3)
    assert out_c.metrics["custom"] == 1.0
    assert out_c.metrics["loss"] == pytest.approx(out_b.metrics["loss"], rel=1e-5)
    for tc in (tc_b, tc_c):
        await tc.optim_step(adv.AdamParams(learning_rate=LR))
    _assert_same(_params(local.service, "builtin"), _params(local.service, "custom"))


async def test_custom_loss_same_update_locally_and_remotely(
    local: adv.LocalBackend, remote: adv.RemoteBackend, remote_service: Service, tiny_model_dir: Path
) -> None:
    here = await _model(local, "same", tiny_model_dir)
    there = await _model(remote, "same", tiny_model_dir)
    datums = await _batch(here)

    def reinforce_with_length_penalty(ds: list[adv.Datum], lps: list[torch.Tensor]) -> torch.Tensor:
        terms = [
            -(d.advantage - 0.01 * d.n_trained) * (lp * torch.tensor(d.loss_mask)).sum()
            for d, lp in zip(ds, lps, strict=True)
        ]
        return torch.stack(terms).mean()

    outs = []
    for model in (here, there):
        tc = await model.training_client()
        outs.append(await tc.forward_backward(datums, reinforce_with_length_penalty))
        await tc.optim_step(adv.AdamParams(learning_rate=LR))
        assert await tc.save_weights() == "same@1"
    assert outs[0].metrics["loss"] == pytest.approx(outs[1].metrics["loss"], rel=1e-6)
    _assert_same(_params(local.service, "same"), _params(remote_service, "same"))
    served = [m.id for m in (await there.openai_client().models.list()).data]
    assert "same@1" in served


async def test_dpo_same_update_in_one_piece_locally_and_pair_by_pair_remotely(
    local: adv.LocalBackend, remote: adv.RemoteBackend, remote_service: Service, tiny_model_dir: Path
) -> None:
    here = await _model(local, "dpo", tiny_model_dir)
    there = await _model(remote, "dpo", tiny_model_dir)
    datums = await _batch(here)
    pairs = [(datums[k], datums[k + 1]) for k in range(0, len(datums) - 1, 2)]
    outs, grads = [], []
    # All pairs in one micro-batch here; one pair per micro-batch there.
    for model, mbs, service in ((here, 8, local.service), (there, 2, remote_service)):
        tc = await model.training_client()
        outs.append(await tc.forward_backward_dpo(pairs, beta=0.5, micro_batch_size=mbs))
        grads.append([p.grad.detach().clone() for p in service.trainable("dpo")[1].params])
        await tc.optim_step(adv.AdamParams(learning_rate=LR))
    assert outs[0].metrics["loss"] == pytest.approx(math.log(2), abs=1e-4)  # step 0: policy = reference
    assert outs[1].metrics["loss"] == pytest.approx(outs[0].metrics["loss"], rel=1e-5)
    assert any(bool(g.any()) for g in grads[0])  # (LoRA's A gets no gradient while B is still 0)
    scale = max(float(g.abs().max()) for g in grads[0])
    for g, h in zip(*grads, strict=True):  # summation order: float noise relative to the largest gradient
        torch.testing.assert_close(g, h, atol=max(1e-7, 1e-6 * scale), rtol=1e-4)
    # Other micro-batches sum in another order. Adam's first step is lr * g / (|g| + eps): about lr * sign(g),
    # but anywhere in (-lr, lr) where |g| is near eps, so the weights are compared where the gradient is not
    # (or is exactly 0, and nothing moves). Near eps the step is sensitive: its change is about
    # lr * eps * dg / |g|^2, so with dg ~ 1e-8 (the gradients' tolerance) a |g| of 2e-6 moved a weight by
    # 1.9e-6 (CI); above 1e-5 it is below 1e-7.
    for x, y, g in zip(_params(local.service, "dpo"), _params(remote_service, "dpo"), grads[0], strict=True):
        firm = (g.abs() > 1e-5) | (g == 0)
        torch.testing.assert_close(x[firm], y[firm], atol=1e-6, rtol=1e-5)


async def test_save_weights_is_served_at_once_and_sample(
    local: adv.LocalBackend, tiny_model_dir: Path
) -> None:
    model = await _model(local, "sw", tiny_model_dir)
    tc = await model.training_client()
    before = await tc.sample(PROMPT, n=1, max_tokens=4, temperature=0.0)
    assert (
        before.weights == "sw@0" and len(before.sequences[0].tokens) == len(before.sequences[0].logprobs) > 0
    )

    # Teach the greedy continuation away from what it is now, through token ids only.
    prompt, seq = before.prompt_tokens, before.sequences[0]
    datum = adv.Datum(
        input_ids=prompt + seq.tokens,
        loss_mask=[0.0] * len(prompt) + [1.0] * len(seq.tokens),
        advantage=-1.0,
        logprobs=[0.0] * len(prompt) + seq.logprobs,
    )
    await tc.forward_backward([datum], "importance_sampling")
    await tc.optim_step(adv.AdamParams(learning_rate=LR))
    name = await tc.save_weights({"custom/metric": 1.5})
    assert name == "sw@1"
    after = await tc.sample(prompt, n=1, max_tokens=4, temperature=0.0)  # token-id prompt, latest weights
    assert after.weights == "sw@1"
    assert after.sequences[0].logprobs[0] < seq.logprobs[0] - 1e-3  # the pushed-down token lost probability
    resp = await model.openai_client().chat.completions.create(
        model="sw@1", messages=PROMPT, max_tokens=1, temperature=0.0
    )
    assert resp.choices[0].model_extra["weights"] == {"model": "sw", "step": 1}
    old = await tc.sample(PROMPT, max_tokens=4, temperature=0.0, step=0)
    assert old.sequences[0].tokens == seq.tokens  # the older step stays servable


async def test_bad_input_is_a_clear_error(
    local: adv.LocalBackend, remote: adv.RemoteBackend, tiny_model_dir: Path
) -> None:
    with pytest.raises(ValueError, match="loss_mask has 1 values for 2 input_ids"):
        adv.Datum(input_ids=[1, 2], loss_mask=[0.0])
    for backend in (local, remote):
        model = await _model(backend, "bad", tiny_model_dir)
        tc = await model.training_client()
        good = adv.Datum(input_ids=[1, 5, 9], loss_mask=[0.0, 1.0, 1.0])
        with pytest.raises(ValueError, match="empty batch"):
            await tc.forward_backward([], "cispo")
        with pytest.raises(ValueError, match="Unknown loss"):
            await tc.forward_backward([good], "nope")
        with pytest.raises(ValueError, match="outside the vocabulary"):
            await tc.forward_backward([good.model_copy(update={"input_ids": [1, 5, 10**9]})], "cross_entropy")
        with pytest.raises(ValueError, match="first token"):
            await tc.forward([adv.Datum(input_ids=[1, 5], loss_mask=[1.0, 1.0])])
        with pytest.raises(ValueError, match="non-finite"):
            await tc.forward_backward([good], lambda ds, lps: torch.tensor(float("nan")))
        with pytest.raises(ValueError, match="max_tokens"):
            await tc.sample(PROMPT, max_tokens=10**6)
        with pytest.raises(ValueError, match="Step 7 of 'bad' is not available"):
            await tc.sample(PROMPT, step=7)
        with pytest.raises(ValueError, match="seed"):  # once hung the engine: torch refused it mid-prefill
            await tc.sample(PROMPT, seed=2**64)
        with pytest.raises(ValueError, match="does not read as TrajectoryGroup"):
            bad = {"groups": [{"trajectories": [{"messages_and_choices": [{"x": 1}]}]}]}
            await model.backend.datums(model.spec, DatumsRequest.model_validate(bad))
    with pytest.raises(BackendRequestError, match="outside the vocabulary"):  # remote: a 400 that says why
        model = await _model(remote, "bad2", tiny_model_dir)
        tc = await model.training_client()
        await tc.forward([adv.Datum(input_ids=[1, 10**9], loss_mask=[0.0, 1.0])])


async def test_a_failed_prefill_fails_its_requests_and_the_engine_goes_on(tiny_model_dir: Path) -> None:
    from advantage.engine.sampling import SamplingParams
    from advantage.engine.torch_engine import TorchEngine

    engine = TorchEngine(tiny_model_dir, dtype="float32")
    real_prefill = engine._prefill

    def broken(batch):  # fails before the batch's rows join: such requests once waited forever
        raise RuntimeError("prefill exploded")

    try:
        engine._prefill = broken  # type: ignore[method-assign]
        with pytest.raises(RuntimeError, match="prefill exploded"):
            await asyncio.wait_for(engine.generate([1, 5, 9], SamplingParams(max_tokens=2)), 30)
        engine._prefill = real_prefill  # type: ignore[method-assign]
        out = await asyncio.wait_for(engine.generate([1, 5, 9], SamplingParams(max_tokens=2)), 30)
        assert len(out[0].token_ids) >= 1
    finally:
        engine.close()
