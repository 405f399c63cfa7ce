"""Each loss against numbers worked out by hand, and the invariants every policy-gradient loss must keep."""

from __future__ import annotations

import math
import typing

import pytest
import torch
from torch import Tensor

from advantage.config import LossName, PolicyLoss
from advantage.training.losses import (
    LOSSES,
    LossConfig,
    aggregate,
    cispo_loss,
    cross_entropy_loss,
    dpo_loss,
    dpo_pairs_loss,
    get_loss,
    gspo_loss,
    importance_sampling_loss,
    ppo_loss,
)

AGGS = ["seq_mean", "token_mean", "dr_grpo"]
POLICY_LOSSES = ["ppo", "cispo", "gspo", "importance_sampling"]

# The shared hand example: B = 2 sequences, T = 3 positions; position (0, 2) is masked out.
LOGP = [[-1.0, -2.0, -0.5], [-0.3, -1.5, -4.0]]  # (B, T)
RATIO = [[1.5, 0.9, 1.0], [0.7, 1.1, 1.4]]  # (B, T) ρ = exp(logp − old_logp); (0, 2) is masked
MASK = [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]  # (B, T): 5 trained tokens, 2 + 3
ADV = [1.0, -2.0]  # (B,)


def example() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    logp = torch.tensor(LOGP, dtype=torch.float64, requires_grad=True)
    old_logp = torch.tensor(LOGP, dtype=torch.float64) - torch.log(torch.tensor(RATIO, dtype=torch.float64))
    return logp, old_logp, torch.tensor(ADV, dtype=torch.float64), torch.tensor(MASK, dtype=torch.float64)


def grad_of(loss: Tensor, logp: Tensor) -> Tensor:
    (g,) = torch.autograd.grad(loss, logp)
    return g


def random_batch(seed: int = 0, b: int = 4, t: int = 6, spread: float = 0.5) -> tuple[Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(b, t, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    old_logp = logp.detach() + spread * torch.randn(b, t, generator=gen, dtype=torch.float64)
    adv = torch.randn(b, generator=gen, dtype=torch.float64)
    mask = (torch.rand(b, t, generator=gen) > 0.3).to(torch.float64)
    mask[:, 0] = 1.0  # every sequence has at least one trained token
    return logp, old_logp, adv, mask


# ---- hand-computed values ----------------------------------------------------------------------------------


# PPO, clip range [1 − 0.2, 1 + 0.28] = [0.8, 1.28]; ℓ = −min(ρA, clip(ρ)A)
#   seq 0, A = +1: ρ 1.5 → −min(1.5, 1.28) = −1.28 (clipped); ρ 0.9 → −0.9
#   seq 1, A = −2: ρ 0.7 → −min(−1.4, −1.6) = 1.6 (clipped); ρ 1.1 → 2.2; ρ 1.4 → −min(−2.8, −2.56) = 2.8
#   Σ = −2.18 + 6.6 = 4.42; token_mean 4.42 / 5 = 0.884; seq_mean (−2.18/2 + 6.6/3) / 2 = (−1.09 + 2.2) / 2
#   = 0.555; dr_grpo 4.42 / (2·3) = 0.736667. clip_frac 2/5; ratio_mean (1.5+.9+.7+1.1+1.4)/5 = 1.12
@pytest.mark.parametrize(
    ("agg", "expected"), [("token_mean", 0.884), ("seq_mean", 0.555), ("dr_grpo", 4.42 / 6)]
)
def test_ppo_by_hand(agg: str, expected: float) -> None:
    loss, m = ppo_loss(*example(), LossConfig(agg=agg))  # type: ignore[arg-type]
    assert loss.item() == pytest.approx(expected)
    assert m["loss"] == pytest.approx(expected)
    assert m["clip_frac"] == pytest.approx(0.4)
    assert m["ratio_mean"] == pytest.approx(1.12)
    assert "kl" not in m


def test_dr_grpo_uses_max_len() -> None:
    # Σ = 4.42 (PPO above); L_max = 4 → 4.42 / (2·4) = 0.5525
    loss, _ = ppo_loss(*example(), LossConfig(agg="dr_grpo", max_len=4))
    assert loss.item() == pytest.approx(0.5525)


# CISPO with eps_max = 1.2; ℓ = −clip(ρ, 0, 1.2)·A·logp
#   seq 0, A = +1: −1.2·1·(−1.0) = 1.2 (ρ 1.5 capped at 1.2); −0.9·1·(−2.0) = 1.8
#   seq 1, A = −2: −0.7·(−2)·(−0.3) = −0.42; −1.1·(−2)·(−1.5) = −3.3; −1.2·(−2)·(−4.0) = −9.6 (1.4 capped)
#   Σ = 3.0 − 13.32 = −10.32; token_mean −2.064; seq_mean (1.5 − 4.44) / 2 = −1.47; dr_grpo −10.32 / 6 = −1.72
@pytest.mark.parametrize(
    ("agg", "expected"), [("token_mean", -2.064), ("seq_mean", -1.47), ("dr_grpo", -1.72)]
)
def test_cispo_by_hand(agg: str, expected: float) -> None:
    loss, m = cispo_loss(*example(), LossConfig(agg=agg, cispo_eps_max=1.2))  # type: ignore[arg-type]
    assert loss.item() == pytest.approx(expected)
    assert m["clip_frac"] == pytest.approx(0.4)  # ρ = 1.5 and 1.4 exceed 1.2


# GSPO with clip range [0.8, 1.1]; s = geometric mean of the masked token ratios
#   seq 0: s = sqrt(1.5·0.9) = sqrt(1.35) = 1.161895; A = +1 → −min(1.161895, 1.1) = −1.1 (clipped)
#   seq 1: s = (0.7·1.1·1.4)^(1/3) = 1.078^(1/3) = 1.025352; A = −2 → −min(−2.050704, −2.050704) = 2.050704
#   token_mean (2·(−1.1) + 3·2.050704) / 5 = 0.790422; seq_mean (−1.1 + 2.050704) / 2 = 0.475352;
#   dr_grpo (−2.2 + 6.152111) / 6 = 0.658685. clip_frac: seq 0's 2 tokens of 5 = 0.4
@pytest.mark.parametrize(
    ("agg", "expected"), [("token_mean", 0.790422), ("seq_mean", 0.475352), ("dr_grpo", 0.658685)]
)
def test_gspo_by_hand(agg: str, expected: float) -> None:
    loss, m = gspo_loss(*example(), LossConfig(agg=agg, eps_high=0.1))  # type: ignore[arg-type]
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert m["clip_frac"] == pytest.approx(0.4)
    # token-weighted: (2·1.161895 + 3·1.025352) / 5 = 1.079969
    assert m["ratio_mean"] == pytest.approx(1.079969, abs=1e-6)


# Importance sampling, ℓ = −ρA: seq 0 [−1.5, −0.9], seq 1 [1.4, 2.2, 2.8]; Σ = −2.4 + 6.4 = 4.0
#   token_mean 0.8; seq_mean (−1.2 + 2.133333) / 2 = 0.466667; dr_grpo 4 / 6 = 0.666667
@pytest.mark.parametrize(
    ("agg", "expected"), [("token_mean", 0.8), ("seq_mean", 0.466667), ("dr_grpo", 0.666667)]
)
def test_importance_sampling_by_hand(agg: str, expected: float) -> None:
    loss, m = importance_sampling_loss(*example(), LossConfig(agg=agg))  # type: ignore[arg-type]
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert m["clip_frac"] == 0.0


def test_cross_entropy_by_hand() -> None:
    # masked NLL: (1.0 + 2.0 + 0.3 + 1.5 + 4.0) / 5 = 8.8 / 5 = 1.76; position (0, 2) ignored
    loss, m = cross_entropy_loss(*example(), LossConfig())
    assert loss.item() == pytest.approx(1.76)
    assert m == {"loss": pytest.approx(1.76)}


def test_kl_k3_by_hand() -> None:
    # d = ref − logp = [[0, ln 2, ·], [0, 0, −ln 2]]
    # k3(ln 2) = 2 − ln 2 − 1 = 0.306853; k3(−ln 2) = 0.5 + ln 2 − 1 = 0.193147; their sum is exactly 0.5
    # token_mean kl = 0.5 / 5 = 0.1; total = PPO 0.884 + β·0.1 = 0.884 + 0.05 = 0.934
    logp, old_logp, adv, mask = example()
    d = torch.tensor([[0.0, math.log(2), 7.0], [0.0, 0.0, -math.log(2)]], dtype=torch.float64)
    loss, m = ppo_loss(logp, old_logp, adv, mask, LossConfig(kl_beta=0.5), ref_logp=logp.detach() + d)
    assert m["kl"] == pytest.approx(0.1)
    assert loss.item() == pytest.approx(0.934)


# ---- invariants --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", POLICY_LOSSES)
@pytest.mark.parametrize("agg", AGGS)
def test_zero_advantage_gives_zero_loss_and_gradient(name: str, agg: str) -> None:
    logp, old_logp, adv, mask = random_batch()
    cfg = LossConfig(agg=agg)  # type: ignore[arg-type]
    loss, _ = get_loss(name)(logp, old_logp, torch.zeros_like(adv), mask, cfg)
    assert loss.item() == 0.0
    assert torch.count_nonzero(grad_of(loss, logp)) == 0


@pytest.mark.parametrize("name", ["ppo", "importance_sampling"])
@pytest.mark.parametrize("agg", AGGS)
def test_ratio_one_reduces_to_reinforce(name: str, agg: str) -> None:
    logp, _, adv, mask = random_batch()
    cfg = LossConfig(agg=agg)  # type: ignore[arg-type]
    loss, m = get_loss(name)(logp, logp.detach(), adv, mask, cfg)
    reinforce = aggregate(-adv[:, None] * logp, mask, cfg)  # −A·logp, aggregated the same way
    assert m["ratio_mean"] == pytest.approx(1.0)
    assert m["clip_frac"] == 0.0
    torch.testing.assert_close(grad_of(loss, logp), grad_of(reinforce, logp))


def test_gspo_at_ratio_one_matches_grpo_with_seq_mean() -> None:
    # d/dθ of s_i at s_i = 1 is the mean of the token gradients, so GSPO = GRPO's per-sequence mean.
    logp, _, adv, mask = random_batch()
    cfg = LossConfig(agg="seq_mean")
    gspo, _ = gspo_loss(logp, logp.detach(), adv, mask, cfg)
    ppo, _ = ppo_loss(logp, logp.detach(), adv, mask, cfg)
    torch.testing.assert_close(grad_of(gspo, logp), grad_of(ppo, logp))


def test_cispo_gradient_is_clipped_weight_times_advantage() -> None:
    logp, old_logp, adv, mask = random_batch(spread=1.5)  # wide spread: some ρ > eps_max
    cfg = LossConfig(agg="token_mean", cispo_eps_max=2.0)
    loss, m = cispo_loss(logp, old_logp, adv, mask, cfg)
    rho = torch.exp(logp.detach() - old_logp)  # (B, T)
    assert m["clip_frac"] > 0
    expected = -rho.clamp(0, 2.0) * adv[:, None] * mask / mask.sum()  # (B, T)
    torch.testing.assert_close(grad_of(loss, logp), expected)


def test_ppo_clip_stops_gradient_outside_the_range() -> None:
    # Hand example: (0, 0) has A > 0, ρ = 1.5 > 1.28 and (1, 0) has A < 0, ρ = 0.7 < 0.8: no gradient.
    # (1, 2) has A < 0, ρ = 1.4 > 1.28 but the min keeps the unclipped term: gradient −ρA/5 = 2.8/5 = 0.56.
    logp, old_logp, adv, mask = example()
    loss, _ = ppo_loss(logp, old_logp, adv, mask, LossConfig())
    g = grad_of(loss, logp)
    assert g[0, 0] == 0.0 and g[1, 0] == 0.0
    # (0, 1): −0.9·1/5 = −0.18; (1, 1): −1.1·(−2)/5 = 0.44
    torch.testing.assert_close(g[0, 1], torch.tensor(-0.18, dtype=torch.float64))
    torch.testing.assert_close(g[1, 1], torch.tensor(0.44, dtype=torch.float64))
    torch.testing.assert_close(g[1, 2], torch.tensor(0.56, dtype=torch.float64))


@pytest.mark.parametrize("name", POLICY_LOSSES)
def test_kl_is_zero_when_ref_equals_logp(name: str) -> None:
    logp, old_logp, adv, mask = random_batch()
    cfg = LossConfig(kl_beta=1.0)
    loss, m = get_loss(name)(logp, old_logp, adv, mask, cfg, ref_logp=logp.detach())
    base, _ = get_loss(name)(logp, old_logp, adv, mask, LossConfig())
    assert m["kl"] == 0.0
    torch.testing.assert_close(grad_of(loss, logp), grad_of(base, logp))


@pytest.mark.parametrize("name", sorted(set(LOSSES) - {"distill_topk"}))  # (B, T, K): its own test below
@pytest.mark.parametrize("agg", AGGS)
def test_masked_positions_contribute_nothing(name: str, agg: str) -> None:
    logp, old_logp, adv, mask = random_batch()
    ref = logp.detach() - 0.3
    cfg = LossConfig(agg=agg, kl_beta=0.1)  # type: ignore[arg-type]
    loss, metrics = get_loss(name)(logp, old_logp, adv, mask, cfg, ref_logp=ref)
    g = grad_of(loss, logp)
    # Garbage where mask == 0, even −inf and huge values, must not change anything.
    junk = torch.tensor([float("-inf"), 50.0, -1e4], dtype=torch.float64)
    masked = mask == 0
    fill = junk.repeat(int(masked.sum()))[: int(masked.sum())]
    logp2 = logp.detach().clone()
    logp2[masked] = fill
    logp2.requires_grad_()
    old2 = old_logp.clone()
    old2[masked] = 7.0
    loss2, metrics2 = get_loss(name)(logp2, old2, adv, mask, cfg, ref_logp=ref)
    g2 = grad_of(loss2, logp2)
    assert loss2.item() == pytest.approx(loss.item())
    assert metrics2 == pytest.approx(metrics)
    torch.testing.assert_close(g2, g)
    assert torch.all(g2[masked] == 0)


@pytest.mark.parametrize("agg", AGGS)
def test_masked_positions_contribute_nothing_to_the_soft_target_loss(agg: str) -> None:
    logp, old_logp, _, mask = random_batch()
    K = 3
    student = (logp.detach()[..., None] - torch.rand(*logp.shape, K, dtype=logp.dtype)).requires_grad_()
    teacher = old_logp[..., None] - torch.rand(*logp.shape, K, dtype=logp.dtype)
    cfg = LossConfig(agg=agg)  # type: ignore[arg-type]
    loss, metrics = get_loss("distill_topk")(student, teacher, torch.zeros(1), mask, cfg)
    g = grad_of(loss, student)
    masked = mask == 0
    student2 = student.detach().clone()
    student2[masked] = torch.tensor([float("-inf"), 50.0, -1e4], dtype=student.dtype)
    student2.requires_grad_()
    teacher2 = teacher.clone()
    teacher2[masked] = 7.0
    loss2, metrics2 = get_loss("distill_topk")(student2, teacher2, torch.zeros(1), mask, cfg)
    g2 = grad_of(loss2, student2)
    assert loss2.item() == pytest.approx(loss.item()) and metrics2 == pytest.approx(metrics)
    torch.testing.assert_close(g2, g)
    assert torch.all(g2[masked] == 0)


# ---- DPO -----------------------------------------------------------------------------------------------------

# β = 0.5, two pairs of summed logprobs (policy π, reference ref; c chosen, r rejected):
#   pair 0: π_c −3, π_r −5, ref_c −4, ref_r −4: (−3+4) − (−5+4) = 2 → z = 0.5·2 = 1.0
#           ℓ = −log σ(1) = log(1 + e^−1) = 0.3132617
#   pair 1: π_c −2, π_r −1, ref_c −2, ref_r −2: (0) − (1) = −1 → z = −0.5
#           ℓ = log(1 + e^0.5) = 0.9740770
#   loss = (0.3132617 + 0.9740770) / 2 = 0.6436693; reward_margin (1.0 − 0.5) / 2 = 0.25; accuracy 1/2
#   chosen_reward 0.5·(1 + 0) / 2 = 0.25; rejected_reward 0.5·(−1 + 1) / 2 = 0
#   dℓ/dπ_c = −(1/P)·β·σ(−z): pair 0 −0.25·σ(−1) = −0.0672354; pair 1 −0.25·σ(0.5) = −0.1556148;
#   dℓ/dπ_r is the same with the sign flipped.
PC, PR, RC, RR = [-3.0, -2.0], [-5.0, -1.0], [-4.0, -2.0], [-4.0, -2.0]


def test_dpo_by_hand() -> None:
    pc = torch.tensor(PC, dtype=torch.float64, requires_grad=True)
    pr = torch.tensor(PR, dtype=torch.float64, requires_grad=True)
    rc = torch.tensor(RC, dtype=torch.float64, requires_grad=True)
    loss, m = dpo_loss(pc, pr, rc, torch.tensor(RR, dtype=torch.float64), beta=0.5)
    assert loss.item() == pytest.approx(0.6436693358)
    assert m["loss"] == pytest.approx(0.6436693358)
    assert m["reward_margin"] == pytest.approx(0.25)
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["chosen_reward"] == pytest.approx(0.25) and m["rejected_reward"] == pytest.approx(0.0)
    g_c, g_r, g_ref = torch.autograd.grad(loss, [pc, pr, rc], allow_unused=True)
    torch.testing.assert_close(g_c, torch.tensor([-0.0672353553, -0.1556148328], dtype=torch.float64))
    torch.testing.assert_close(g_r, -g_c)
    assert g_ref is None or torch.all(g_ref == 0)  # the reference is a constant


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 5.0])
def test_dpo_equal_margins_give_log_2(beta: float) -> None:
    # policy = reference (the adapter at step 0): every margin is 0 and −log σ(0) = log 2, whatever β
    lp = torch.tensor([-3.0, -7.5, -0.2], dtype=torch.float64)
    loss, m = dpo_loss(lp, lp - 1.0, lp, lp - 1.0, beta)
    assert loss.item() == pytest.approx(math.log(2))
    assert m["reward_margin"] == 0.0 and m["accuracy"] == 0.0


def test_dpo_gradient_raises_chosen_and_lowers_rejected() -> None:
    gen = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-torch.rand(5, generator=gen, dtype=torch.float64) * 20 for _ in range(4))
    pc.requires_grad_()
    pr.requires_grad_()
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.1)
    g_c, g_r = torch.autograd.grad(loss, [pc, pr])
    assert torch.all(g_c < 0) and torch.all(g_r > 0)  # a descent step raises π_c and lowers π_r
    # A wider margin in the right direction lowers the loss.
    wider, _ = dpo_loss(pc.detach() + 1.0, pr.detach(), rc, rr, beta=0.1)
    assert wider.item() < loss.item()


def test_dpo_in_the_registry_sums_each_rows_masked_tokens() -> None:
    # Rows (0, 1) are pair 0 and rows (2, 3) pair 1; each row's masked tokens sum to the hand example's
    # numbers, and the masked-out last position holds −inf, which must change nothing.
    inf = float("inf")
    logp = torch.tensor(
        [[-1.0, -2.0, -inf], [-4.0, -1.0, -inf], [-1.5, -0.5, -inf], [-0.25, -0.75, -inf]],
        dtype=torch.float64,
        requires_grad=True,
    )
    ref = torch.tensor([[-2.0, -2.0, 0.0], [-3.0, -1.0, 0.0], [-1.0, -1.0, 0.0], [-1.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]] * 4)
    cfg = LossConfig(dpo_beta=0.5)
    loss, m = dpo_pairs_loss(logp, torch.zeros_like(mask), torch.zeros(4), mask, cfg, ref.double())
    assert loss.item() == pytest.approx(0.6436693358) and m["accuracy"] == pytest.approx(0.5)
    (g,) = torch.autograd.grad(loss, logp)
    assert torch.all(g[:, 2] == 0) and torch.isfinite(g).all()
    torch.testing.assert_close(g[0, 0], torch.tensor(-0.0672353553, dtype=torch.float64))
    with pytest.raises(ValueError, match="ref_logp"):
        dpo_pairs_loss(logp, logp, torch.zeros(4), mask, cfg)
    with pytest.raises(ValueError, match="odd number"):
        dpo_pairs_loss(logp[:3], logp[:3], torch.zeros(3), mask[:3], cfg, ref[:3].double())
    with pytest.raises(ValueError, match="dpo_beta"):
        LossConfig(dpo_beta=0.0)


# ---- registry and errors -----------------------------------------------------------------------------------


def _names(t: object) -> set[str]:
    return {x for a in typing.get_args(t) for x in (_names(a) if typing.get_args(a) else {a})}


def test_registry() -> None:
    assert set(LOSSES) == {
        "ppo", "grpo", "cispo", "gspo", "importance_sampling", "cross_entropy", "dpo", "distill_topk"
    }  # fmt: skip
    assert set(LOSSES) == _names(LossName)  # the names configs take, without torch, are the registry's
    assert _names(PolicyLoss) <= set(LOSSES)
    assert get_loss("grpo") is ppo_loss
    with pytest.raises(ValueError, match="unknown loss 'dapo'.*cispo.*cross_entropy.*grpo"):
        get_loss("dapo")


def test_bad_config_raises() -> None:
    with pytest.raises(ValueError, match="agg\n.*'token_mean', 'seq_mean' or 'dr_grpo'"):
        LossConfig(agg="sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eps"):
        LossConfig(eps=1.5)


def test_kl_without_ref_raises() -> None:
    with pytest.raises(ValueError, match="ref_logp"):
        cispo_loss(*example(), LossConfig(kl_beta=0.1))


def test_shape_mismatch_raises() -> None:
    logp, old_logp, adv, mask = example()
    with pytest.raises(ValueError, match="adv must be"):
        ppo_loss(logp, old_logp, adv[:1], mask, LossConfig())
    with pytest.raises(ValueError, match="mask must have"):
        ppo_loss(logp, old_logp, adv, mask[:, :2], LossConfig())
