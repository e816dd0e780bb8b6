"""The GRPO family's pure functions against values computed by hand."""

import math

import pytest
import torch

from posttrain.algos import grpo as G


def test_grpo_advantages_with_and_without_std():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0])  # groups of 3: [1,0,0], [1,2,2]
    mean1, mean2 = 1 / 3, 5 / 3
    std = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)  # unbiased, the same spread in both groups
    want = torch.tensor([2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3])
    assert torch.allclose(G.grpo_advantages(r, 3, scale_by_std=False), want, atol=1e-6)
    assert torch.allclose(G.grpo_advantages(r, 3), want / (std + 1e-4), atol=1e-6)
    assert mean1 + want[0] == pytest.approx(1.0) and mean2 + want[4] == pytest.approx(2.0)
    assert torch.equal(G.grpo_advantages(torch.ones(4), 2), torch.zeros(4))  # a group that scores alike: 0
    with pytest.raises(ValueError, match="groups of 3"):
        G.grpo_advantages(torch.ones(4), 3)
    with pytest.raises(ValueError, match=">= 2"):
        G.grpo_advantages(torch.ones(4), 1)


def test_informative_groups():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5])
    assert G.informative_groups(r, 2).tolist() == [False, True, False]
    assert G.informative_groups(torch.tensor([0.0, 0.05]), 2, tol=0.1).tolist() == [False]


def test_overlong_penalty_is_dapos_piecewise_linear():
    lengths = torch.tensor([10, 12, 14, 16, 17])
    # L = 16, cache 4: free up to 12, then -(len - 12)/4, and -1 past 16
    assert G.overlong_penalty(lengths, 16, 4).tolist() == [0.0, 0.0, -0.5, -1.0, -1.0]
    with pytest.raises(ValueError, match="cache"):
        G.overlong_penalty(lengths, 16, 0)


def test_sequence_log_ratio_is_length_normalised():
    logp = torch.tensor([[0.0, -1.0, -2.0, 0.0], [-1.0, -1.0, 0.0, 0.0]])
    old = torch.tensor([[0.0, -1.5, -1.0, 5.0], [-2.0, -1.0, 0.0, 9.0]])
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]])
    # row 0: (0.5 + -1.0) / 2 ; row 1: (1.0 + 0) / 2 ; masked entries (the 5 and 9) ignored
    assert torch.allclose(G.sequence_log_ratio(logp, old, mask), torch.tensor([-0.25, 0.5]))


def test_clipped_surrogate_asymmetric():
    ratio = torch.tensor([0.5, 0.5, 1.5, 1.5, 1.1])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0])
    loss, clipped = G.clipped_surrogate(ratio, adv, clip_low=0.2, clip_high=0.3)
    # A>0, r=0.5: min(0.5, 0.8) = 0.5 (unclipped); A<0, r=0.5: min(-0.5, -0.8) = -0.8 (clipped at 1-0.2)
    # A>0, r=1.5: min(1.5, 1.3) = 1.3 (clipped at 1+0.3); A<0, r=1.5: min(-1.5, -1.3) = -1.5; r=1.1 inside
    assert torch.allclose(loss, -torch.tensor([0.5, -0.8, 1.3, -1.5, 1.1]))
    assert clipped.tolist() == [False, True, True, False, False]


def test_aggregations():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert G.aggregate(per_token, mask, "token_mean", 4).item() == pytest.approx(10 / 4)
    assert G.aggregate(per_token, mask, "sequence_mean", 4).item() == pytest.approx((2.0 + 4.0) / 2)
    assert G.aggregate(per_token, mask, "constant", 8).item() == pytest.approx(10 / (2 * 8))
    with pytest.raises(ValueError):
        G.aggregate(per_token, mask, "sum", 4)


def test_k3_kl_loss_term_and_its_gradient():
    logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    ref = torch.tensor([-1.5, -2.0])
    kl = G.kl_k3_loss_term(logp, ref)
    want = torch.exp(ref - logp.detach()) - (ref - logp.detach()) - 1
    assert torch.allclose(kl, want) and kl[1].item() == 0.0 and (kl >= 0).all()
    kl.sum().backward()
    # d/dlogp [e^(ref-logp) - (ref-logp) - 1] = 1 - e^(ref-logp)
    assert torch.allclose(logp.grad, 1 - torch.exp(ref - logp.detach()))
