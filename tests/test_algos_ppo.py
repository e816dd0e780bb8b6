"""Hand-computed checks for posttrain.algos.ppo."""

import math

import pytest
import torch
from torch.testing import assert_close

from posttrain.algos import ppo

torch.set_num_threads(1)


def t(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype)


# --- masked statistics -------------------------------------------------------


def test_masked_mean_ignores_padding():
    x = t([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
    mask = t([[1, 1, 0], [1, 1, 0]])
    assert_close(ppo.masked_mean(x, mask), t(3.0))  # (1+2+4+5)/4
    assert_close(ppo.masked_mean(x, mask, dim=1), t([1.5, 4.5]))
    # bool mask works the same
    assert_close(ppo.masked_mean(x, mask.bool()), t(3.0))


def test_masked_var_biased_and_unbiased():
    x = t([[1.0, 2.0, -50.0], [4.0, 5.0, 100.0]])
    mask = t([[1, 1, 0], [1, 1, 0]])
    # valid entries 1,2,4,5: mean 3, sum of squared deviations 10
    assert_close(ppo.masked_var(x, mask, unbiased=False), t(10.0 / 4))
    assert_close(ppo.masked_var(x, mask), t(10.0 / 3))


def test_masked_whiten_uses_valid_tokens_only():
    mask = t([[1, 1, 0], [1, 1, 0]])
    x = t([[1.0, 2.0, -50.0], [4.0, 5.0, 100.0]])
    out = ppo.masked_whiten(x, mask)
    s = math.sqrt(10.0 / 3)
    assert_close(out, t([[-2 / s, -1 / s, 0.0], [1 / s, 2 / s, 0.0]]))
    valid = out[mask.bool()]
    assert_close(valid.mean(), t(0.0))
    assert_close(valid.std(), t(1.0))
    # padding values do not matter
    x2 = x.clone()
    x2[:, 2] = t([7.0, -3.0])
    assert_close(ppo.masked_whiten(x2, mask), out)
    # shift_mean=False keeps the original mean (3) on valid tokens
    out_ns = ppo.masked_whiten(x, mask, shift_mean=False)
    assert_close(out_ns[mask.bool()], t([3 - 2 / s, 3 - 1 / s, 3 + 1 / s, 3 + 2 / s]))


# --- KL estimators -----------------------------------------------------------


def test_kl_estimators_by_hand():
    logp = t([-1.0, -2.0, -0.5])
    ref = t([-1.5, -1.0, -0.5])
    assert_close(ppo.kl_k1(logp, ref), t([0.5, -1.0, 0.0]))
    assert_close(ppo.kl_k2(logp, ref), t([0.125, 0.5, 0.0]))
    # r = exp(ref - logp) = [e^-0.5, e, 1]; k3 = r - 1 - log r
    expected = t([math.exp(-0.5) - 1 + 0.5, math.e - 1 - 1, 0.0])
    assert_close(ppo.kl_k3(logp, ref), expected)
    assert_close(expected, t([0.10653066, 0.71828183, 0.0]), atol=1e-7, rtol=0)


# --- rewards and GAE ---------------------------------------------------------


def test_token_rewards_score_at_last_valid_token():
    score = t([1.0, 2.0, 5.0])
    kl = t([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8], [1.0, 1.0, 1.0, 1.0]])
    mask = t([[1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]])  # row 1 left-padded prompt, row 2 empty
    r = ppo.token_rewards(score, kl, mask, kl_coef=0.1)
    expected = t(
        [
            [-0.01, -0.02, -0.03 + 1.0, 0.0],
            [0.0, -0.06, -0.07 + 2.0, 0.0],
            [0.0, 0.0, 0.0, 0.0],
        ]
    )
    assert_close(r, expected)
    r_clip = ppo.token_rewards(score, kl, mask, kl_coef=0.1, score_clip=1.5)
    assert_close(r_clip[1, 2], t(-0.07 + 1.5))


def test_gae_1x3_by_hand():
    # gamma=0.9, lam=0.8 -> gamma*lam = 0.72
    rewards = t([[0.0, 0.0, 1.0]])
    values = t([[0.5, 0.6, 0.7]])
    mask = t([[1, 1, 1]])
    adv, ret = ppo.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # t=2: delta = 1 - 0.7 = 0.3                      A2 = 0.3
    # t=1: delta = 0.9*0.7 - 0.6 = 0.03               A1 = 0.03 + 0.72*0.3 = 0.246
    # t=0: delta = 0.9*0.6 - 0.5 = 0.04               A0 = 0.04 + 0.72*0.246 = 0.21712
    assert_close(adv, t([[0.21712, 0.246, 0.3]]))
    assert_close(ret, t([[0.71712, 0.846, 1.0]]))


def test_gae_treats_padding_as_terminal():
    rewards = t([[0.0, 1.0, 999.0]])
    values = t([[0.5, 0.6, 999.0]])
    mask = t([[1, 1, 0]])
    adv, ret = ppo.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # t=1 is terminal: A1 = 1 - 0.6 = 0.4; A0 = (0.9*0.6 - 0.5) + 0.72*0.4 = 0.328
    assert_close(adv, t([[0.328, 0.4, 0.0]]))
    assert_close(ret, t([[0.828, 1.0, 0.0]]))


def test_gae_left_padded_rows_match_unpadded():
    rewards = t([[0.0, 0.0, 1.0]])
    values = t([[0.5, 0.6, 0.7]])
    adv, _ = ppo.gae(rewards, values, t([[1, 1, 1]]), 0.9, 0.8)
    adv_p, _ = ppo.gae(t([[3.0, 0.0, 0.0, 1.0, 7.0]]), t([[9.0, 0.5, 0.6, 0.7, 9.0]]), t([[0, 1, 1, 1, 0]]), 0.9, 0.8)
    assert_close(adv_p[:, 1:4], adv)
    assert_close(adv_p[:, [0, 4]], t([[0.0, 0.0]]))


# --- losses ------------------------------------------------------------------


def _ppo_batch():
    # ratios 1.5, 0.5, 1.5, 0.5 and a padding token with wild values
    old = t([[0.0, 0.0, 0.0, 0.0, 0.0]])
    logp = t([[math.log(1.5), math.log(0.5), math.log(1.5), math.log(0.5), 5.0]]).requires_grad_(True)
    adv = t([[1.0, 1.0, -1.0, -1.0, 100.0]])
    mask = t([[1, 1, 1, 1, 0]])
    return logp, old, adv, mask


def test_policy_loss_clipped_by_hand():
    logp, old, adv, mask = _ppo_batch()
    loss, clip_frac, approx_kl = ppo.policy_loss_clipped(logp, old, adv, mask, clip_eps=0.2)
    # per token max(-A r, -A clip(r)):
    #   r=1.5,A=+1: max(-1.5,-1.2) = -1.2  (clipped)
    #   r=0.5,A=+1: max(-0.5,-0.8) = -0.5  (not clipped)
    #   r=1.5,A=-1: max( 1.5, 1.2) =  1.5  (not clipped)
    #   r=0.5,A=-1: max( 0.5, 0.8) =  0.8  (clipped)
    assert_close(loss, t((-1.2 - 0.5 + 1.5 + 0.8) / 4))
    assert_close(clip_frac, t(0.5))
    k3 = lambda r: (r - 1) - math.log(r)  # noqa: E731
    assert_close(approx_kl, t((2 * k3(1.5) + 2 * k3(0.5)) / 4))
    loss.backward()
    # clipped tokens (and padding) get zero gradient; others get -A*r/4
    assert_close(logp.grad, t([[0.0, -0.5 / 4, 1.5 / 4, 0.0, 0.0]]))


def test_policy_loss_is_weight_multiplies_per_token_loss():
    logp, old, adv, mask = _ppo_batch()
    w = t([[2.0, 1.0, 1.0, 1.0, 50.0]])
    loss, _, _ = ppo.policy_loss_clipped(logp, old, adv, mask, clip_eps=0.2, is_weight=w)
    assert_close(loss, t((-2.4 - 0.5 + 1.5 + 0.8) / 4))


def test_value_loss_clipped_by_hand():
    values = t([[1.0, 1.0, 3.0]])
    old = t([[0.5, 0.9, 0.0]])
    returns = t([[2.0, 0.0, 0.0]])
    mask = t([[1, 1, 0]])
    loss, clip_frac = ppo.value_loss_clipped(values, old, returns, mask, clip_eps=0.2)
    # tok0: (1-2)^2 = 1 vs clipped v = 0.7 -> (0.7-2)^2 = 1.69 -> 1.69 (clipping active)
    # tok1: (1-0)^2 = 1, v within old±0.2 -> 1
    assert_close(loss, t(0.5 * (1.69 + 1.0) / 2))
    assert_close(clip_frac, t(0.5))
    # no clipping when everything is inside the trust region
    loss2, frac2 = ppo.value_loss_clipped(values, values, returns, mask, clip_eps=0.2)
    assert_close(loss2, t(0.5 * (1.0 + 1.0) / 2))
    assert_close(frac2, t(0.0))


def test_truncated_is_weight():
    trainer = t([-1.0, -1.0, -2.0]).requires_grad_(True)
    engine = t([-1.5, -0.5, -2.0])
    w = ppo.truncated_is_weight(trainer, engine, cap=1.5)
    assert_close(w, t([1.5, math.exp(-0.5), 1.0]))  # exp(0.5)=1.65 is capped
    assert not w.requires_grad


# --- logit utilities -----------------------------------------------------------


def test_entropy_from_logits():
    logits = t([[0.0, 0.0, 0.0, 0.0], [math.log(0.5), math.log(0.25), math.log(0.25), -math.inf]])
    logits.requires_grad_(True)
    # uniform over 4 -> log 4; (0.5, 0.25, 0.25, 0) -> 1.5 log 2 (masked token adds nothing)
    ent = ppo.entropy_from_logits(logits)
    assert_close(ent, t([math.log(4.0), 1.5 * math.log(2.0)]))
    ent.sum().backward()
    assert torch.isfinite(logits.grad).all()
    # shift invariance
    ent2 = ppo.entropy_from_logits(t([[math.log(0.5), math.log(0.25), math.log(0.25)]]) + 3.0)
    assert_close(ent2, t([1.5 * math.log(2.0)]))


def test_logprobs_from_logits():
    logits = t([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[2, 0]])
    expected = t([[3.0 - math.log(math.e + math.e**2 + math.e**3), -math.log(3.0)]])
    assert_close(ppo.logprobs_from_logits(logits, labels), expected)
    # low-precision path agrees with float32 log_softmax
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 5, 11, generator=g)
    lab = torch.randint(0, 11, (2, 5), generator=g)
    ref = torch.log_softmax(z, -1).gather(-1, lab.unsqueeze(-1)).squeeze(-1)
    assert_close(ppo.logprobs_from_logits(z, lab), ref)
    out_bf16 = ppo.logprobs_from_logits(z.bfloat16(), lab)
    assert out_bf16.dtype == torch.bfloat16
    assert_close(out_bf16.float(), ref, atol=0.05, rtol=0.02)


# --- KL controllers --------------------------------------------------------------


def test_fixed_kl_controller():
    c = ppo.FixedKLController(0.05)
    assert c.update(100.0, 10) == 0.05
    assert c.value == 0.05
    c2 = ppo.FixedKLController(1.0)
    c2.load_state_dict(c.state_dict())
    assert c2.value == 0.05


def test_adaptive_kl_controller_direction_and_magnitude():
    c = ppo.AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    c.update(12.0, n_steps=100)  # error clipped to +0.2 -> x(1 + 0.2*100/10000)
    assert c.value == pytest.approx(0.1 * 1.002)
    c.update(3.0, n_steps=100)  # error clipped to -0.2
    assert c.value == pytest.approx(0.1 * 1.002 * 0.998)
    before = c.value
    c.update(6.6, n_steps=100)  # error 0.1, unclipped
    assert c.value == pytest.approx(before * 1.001)
    assert c.value > before
    before = c.value
    c.update(5.4, n_steps=100)  # error -0.1
    assert c.value == pytest.approx(before * 0.999)
    assert c.value < before


def test_adaptive_kl_controller_state_dict_roundtrip():
    c = ppo.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(12.0, 500)
    c2 = ppo.AdaptiveKLController(0.5, target=1.0, horizon=1.0)
    c2.load_state_dict(c.state_dict())
    assert (c2.value, c2.target, c2.horizon) == (c.value, 6.0, 10000.0)
    c.update(1.0, 10)
    c2.update(1.0, 10)
    assert c2.value == c.value


def _moments_on_rank(rank: int, port: int, x: torch.Tensor, mask: torch.Tensor, out_dir: str) -> None:
    import os

    from posttrain.dist.rank import all_ranks_masked_moments

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        mean, var = all_ranks_masked_moments(x[rank], mask[rank])
        torch.save({"mean": mean, "var": var}, f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_whitening_moments_cover_every_ranks_tokens(tmp_path):
    """Under N processes advantages are whitened with the whole batch's statistics, not one rank's."""
    from posttrain.dist.launcher import _free_port
    from posttrain.dist.rank import all_ranks_masked_moments

    x = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mask = torch.ones(2, 3, 5)
    mask[0, :, 3:] = 0  # rank 0 has fewer valid tokens than rank 1
    mask[1, 0, 1:] = 0
    both = ppo.masked_mean(x.flatten(0, 1), mask.flatten(0, 1)), ppo.masked_var(x.flatten(0, 1), mask.flatten(0, 1))
    one = all_ranks_masked_moments(x[0], mask[0])  # one process: this batch's own moments
    assert_close(one[0], ppo.masked_mean(x[0], mask[0]))
    assert_close(one[1], ppo.masked_var(x[0], mask[0]))
    torch.multiprocessing.spawn(_moments_on_rank, args=(_free_port(), x, mask, str(tmp_path)), nprocs=2)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert_close(got["mean"], both[0])
        assert_close(got["var"], both[1])


def test_rloo_advantages_against_hand_values():
    rewards = t([1.0, 0.0, 0.0, 1.0, 0.5, 0.5])  # two prompts, three samples each
    # prompt 1: 1 - (0+0)/2, 0 - (1+0)/2, 0 - (1+0)/2; prompt 2: 1 - 0.5, 0.5 - 0.75, 0.5 - 0.75
    assert_close(ppo.rloo_advantages(rewards, 3), t([1.0, -0.5, -0.5, 0.5, -0.25, -0.25]))
    assert_close(ppo.rloo_advantages(t([0.7, 0.7, 0.7, 0.7]), 2), t([0.0, 0.0, 0.0, 0.0]))  # all alike: no signal
    with pytest.raises(ValueError, match="at least 2"):
        ppo.rloo_advantages(rewards, 1)
    with pytest.raises(ValueError, match="groups of 4"):
        ppo.rloo_advantages(rewards, 4)
