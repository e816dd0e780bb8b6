"""Hand-computed checks for posttrain.algos.kd."""

import math

import pytest
import torch
from torch.testing import assert_close

from posttrain.algos import kd

torch.set_num_threads(1)


def logits_of(probs):
    """(B, T, V) logits whose softmax is ``probs`` (nested lists)."""
    return torch.tensor(probs, dtype=torch.float64).log()


ONE = torch.ones(1, 1, dtype=torch.float64)
P_T = [0.5, 0.3, 0.2]  # teacher on a 3-token vocab
P_S = [1 / 3, 1 / 3, 1 / 3]  # student


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def test_forward_kl_by_hand():
    s, te = logits_of([[P_S]]), logits_of([[P_T]])
    # sum p_t (log p_t - log p_s) = 0.5 ln1.5 + 0.3 ln0.9 + 0.2 ln0.6
    expected = 0.5 * math.log(1.5) + 0.3 * math.log(0.9) + 0.2 * math.log(0.6)
    assert expected == pytest.approx(0.0689593, abs=1e-7)
    assert_close(kd.forward_kl(s, te, ONE), torch.tensor(expected, dtype=torch.float64))


def test_reverse_kl_by_hand():
    s, te = logits_of([[P_S]]), logits_of([[P_T]])
    # (1/3) * ln((1/3)^3 / (0.5*0.3*0.2)) = (1/3) ln(100/81)
    expected = math.log(100 / 81) / 3
    assert_close(kd.reverse_kl(s, te, ONE), torch.tensor(expected, dtype=torch.float64))


def test_mask_ignores_padding_positions():
    s = logits_of([[P_S, [0.9, 0.05, 0.05]]])
    te = logits_of([[P_T, [0.05, 0.05, 0.9]]])
    mask = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    assert_close(kd.forward_kl(s, te, mask), torch.tensor(kl(P_T, P_S), dtype=torch.float64))
    assert_close(kd.forward_kl(s, te, mask.bool()), torch.tensor(kl(P_T, P_S), dtype=torch.float64))


def test_temperature_and_t2_scaling():
    # teacher logits [0, 2 ln 3] at T=2 -> [0, ln 3] -> p_t = [0.25, 0.75]; student uniform
    te = torch.tensor([[[0.0, 2 * math.log(3.0)]]], dtype=torch.float64)
    s = torch.zeros(1, 1, 2, dtype=torch.float64)
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert_close(kd.forward_kl(s, te, ONE, temperature=2.0), torch.tensor(expected, dtype=torch.float64))
    assert_close(
        kd.forward_kl(s, te, ONE, temperature=2.0, scale_by_t2=True),
        torch.tensor(4 * expected, dtype=torch.float64),
    )


def test_kl_handles_zero_probability_tokens_without_nan():
    s = torch.tensor([[[0.0, 0.0, -math.inf]]], requires_grad=True)
    te = torch.tensor([[[0.0, math.log(3.0), -math.inf]]])
    loss = kd.forward_kl(s, te, torch.ones(1, 1))
    loss.backward()
    assert_close(loss, torch.tensor(0.25 * math.log(0.5) + 0.75 * math.log(1.5)))
    assert torch.isfinite(s.grad).all()


# --- generalized JSD -----------------------------------------------------------

PT2, PS2 = [0.75, 0.25], [0.25, 0.75]


def test_jsd_endpoints_match_trl_convention():
    s, te = logits_of([[P_S]]), logits_of([[P_T]])
    # beta = 0 -> forward KL(teacher || student); beta = 1 -> reverse KL(student || teacher)
    assert_close(kd.generalized_jsd(s, te, ONE, beta=0.0), torch.tensor(kl(P_T, P_S), dtype=torch.float64))
    assert_close(kd.generalized_jsd(s, te, ONE, beta=1.0), torch.tensor(kl(P_S, P_T), dtype=torch.float64))


def test_jsd_limits_scale_like_forward_and_reverse_kl():
    s, te = logits_of([[P_S]]), logits_of([[P_T]])
    b = 1e-5
    # JSD(beta) ~ beta KL(T||S) as beta -> 0 and ~ (1-beta) KL(S||T) as beta -> 1
    fwd = torch.tensor(kl(P_T, P_S), dtype=torch.float64)
    rev = torch.tensor(kl(P_S, P_T), dtype=torch.float64)
    assert_close(kd.generalized_jsd(s, te, ONE, beta=b) / b, fwd, rtol=1e-3, atol=0)
    assert_close(kd.generalized_jsd(s, te, ONE, beta=1 - b) / b, rev, rtol=1e-3, atol=0)


def test_jsd_symmetric_by_hand():
    s, te = logits_of([[PS2]]), logits_of([[PT2]])
    # m = [0.5, 0.5]; KL(t||m) = KL(s||m) = 0.75 ln 1.5 + 0.25 ln 0.5
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert_close(kd.generalized_jsd(s, te, ONE, beta=0.5), torch.tensor(expected, dtype=torch.float64))


def test_jsd_beta_weights_teacher_in_mixture_by_hand():
    s, te = logits_of([[PS2]]), logits_of([[PT2]])
    # beta = 0.1: m = 0.1 p_t + 0.9 p_s = [0.3, 0.7]; JSD = 0.1 KL(t||m) + 0.9 KL(s||m)
    m = [0.3, 0.7]
    expected = 0.1 * kl(PT2, m) + 0.9 * kl(PS2, m)
    wrong = 0.9 * kl(PT2, m) + 0.1 * kl(PS2, m)
    out = kd.generalized_jsd(s, te, ONE, beta=0.1)
    assert_close(out, torch.tensor(expected, dtype=torch.float64))
    assert abs(out.item() - wrong) > 1e-3


def test_jsd_zero_when_equal():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 7, generator=g)
    mask = torch.ones(2, 3)
    for beta in (0.0, 0.3, 0.5, 1.0):
        assert_close(kd.generalized_jsd(z, z.clone(), mask, beta=beta), torch.tensor(0.0), atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        kd.generalized_jsd(z, z, mask, beta=1.5)


# --- top-k teacher -----------------------------------------------------------------


def test_topk_with_full_vocab_equals_forward_kl():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 4, 9, generator=g)
    te = torch.randn(2, 4, 9, generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.float32)
    idx, lp = kd.topk_teacher(te, k=9, temperature=1.5)
    assert idx.shape == (2, 4, 9) and lp.shape == (2, 4, 9)
    assert_close(
        kd.forward_kl_topk(s, idx, lp, mask, temperature=1.5),
        kd.forward_kl(s, te, mask, temperature=1.5),
    )


def test_topk_renormalisation_by_hand():
    te = logits_of([[[0.4, 0.3, 0.2, 0.1]]])
    s = logits_of([[[0.1, 0.2, 0.3, 0.4]]])
    idx, lp = kd.topk_teacher(te, k=2)
    assert idx.tolist() == [[[0, 1]]]
    # teacher top-2 renormalised: [0.4, 0.3] / 0.7
    assert_close(lp.exp(), torch.tensor([[[4 / 7, 3 / 7]]], dtype=torch.float64))
    # the student keeps its full-vocabulary probabilities on {0, 1}: [0.1, 0.2], not renormalised
    expected = kl([4 / 7, 3 / 7], [0.1, 0.2])
    assert expected > kl([4 / 7, 3 / 7], [1 / 3, 2 / 3])  # mass outside the top-k costs something
    assert_close(kd.forward_kl_topk(s, idx, lp, ONE), torch.tensor(expected, dtype=torch.float64))


def test_mixed_loss():
    assert_close(kd.mixed_loss(torch.tensor(2.0), torch.tensor(1.0), alpha=0.3), torch.tensor(1.3))
    with pytest.raises(ValueError):
        kd.mixed_loss(torch.tensor(2.0), torch.tensor(1.0), alpha=1.2)
