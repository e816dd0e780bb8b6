"""Hand-computed checks for posttrain.algos.merge."""

import math

import pytest
import torch
from torch.testing import assert_close

from posttrain.algos import merge

torch.set_num_threads(1)


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


# --- linear / EMA --------------------------------------------------------------


def test_linear_weighted_average():
    a, b = t([[1.0, 2.0]]), t([[5.0, -2.0]])
    assert_close(merge.linear([a, b], [1.0, 3.0]), t([[4.0, -1.0]]))  # 0.25 a + 0.75 b
    assert_close(merge.linear([a, b], [0.5, 0.5], normalize=False), t([[3.0, 0.0]]))


def test_linear_keeps_dtype():
    a, b = t([1.0, 2.0]).bfloat16(), t([3.0, 4.0]).bfloat16()
    out = merge.linear([a, b], [1.0, 1.0])
    assert out.dtype == torch.bfloat16
    assert_close(out, t([2.0, 3.0]).bfloat16())


def test_linear_rejects_bad_weights():
    a, b = t([1.0]), t([2.0])
    with pytest.raises(ValueError):
        merge.linear([a, b], [0.5, 0.6], normalize=False)  # sum 1.1
    with pytest.raises(ValueError):
        merge.linear([a, b], [1.0])  # length mismatch
    with pytest.raises(ValueError):
        merge.linear([a, b], [1.5, -0.5])  # negative
    with pytest.raises(ValueError):
        merge.linear([a, t([1.0, 2.0])], [0.5, 0.5])  # shape mismatch
    # negative allowed explicitly (extrapolation), sums to 1
    assert_close(merge.linear([a, b], [1.5, -0.5], normalize=False, allow_negative=True), t([0.5]))


def test_ema_update_mu_is_weight_of_new():
    ema, new = t([0.0, 1.0]), t([10.0, 1.0])
    assert_close(merge.ema_update(ema, new, mu=0.01), t([0.1, 1.0]))
    assert_close(merge.ema_update(ema, new, mu=0.0), ema)
    assert_close(merge.ema_update(ema, new, mu=1.0), new)
    with pytest.raises(ValueError):
        merge.ema_update(ema, new, mu=1.5)


# --- SLERP ---------------------------------------------------------------------


def test_slerp_endpoints():
    a, b = t([1.0, 0.0, 0.0]), t([2.0, 2.0, 0.0])
    assert_close(merge.slerp(a, b, 0.0), a)
    assert_close(merge.slerp(a, b, 1.0), b)


def test_slerp_orthogonal_unit_vectors_midpoint():
    a, b = t([1.0, 0.0]), t([0.0, 1.0])
    assert_close(merge.slerp(a, b, 0.5), (a + b) / math.sqrt(2))
    # unlike lerp, the norm is preserved
    assert_close(merge.slerp(a, b, 0.5).norm(), t(1.0))


def test_slerp_60_degrees_by_hand_and_shape():
    a = t([[1.0, 0.0]])
    b = t([[0.5, math.sqrt(3) / 2]])
    out = merge.slerp(a, b, 0.5)
    assert out.shape == (1, 2)
    assert_close(out, t([[math.sqrt(3) / 2, 0.5]]))  # 30 degrees
    # sin(Omega/4)/sin(Omega) etc. at t=0.25 -> 15 degrees
    assert_close(merge.slerp(a, b, 0.25), t([[math.cos(math.pi / 12), math.sin(math.pi / 12)]]))


def test_slerp_near_parallel_and_zero_fall_back_to_lerp():
    a = t([1.0, 2.0, 3.0])
    b = t([1.0, 2.0, 3.0001])
    out = merge.slerp(a, b, 0.5)
    assert torch.isfinite(out).all()
    assert_close(out, 0.5 * (a + b))
    assert_close(merge.slerp(a, a.clone(), 0.3), a)
    z = torch.zeros(3)
    assert_close(merge.slerp(z, a, 0.25), 0.25 * a)


def test_slerp_keeps_dtype():
    a, b = t([1.0, 0.0]).bfloat16(), t([0.0, 1.0]).bfloat16()
    out = merge.slerp(a, b, 0.5)
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), t([1 / math.sqrt(2)] * 2), atol=1e-2, rtol=1e-2)


# --- task vectors, WARP ---------------------------------------------------------


def test_task_vector_and_arithmetic():
    base = t([1.0, 1.0])
    assert_close(merge.task_vector(t([3.0, 0.0]), base), t([2.0, -1.0]))
    out = merge.task_arithmetic(base, [t([1.0, 0.0]), t([0.0, 2.0])], [0.5, 0.25])
    assert_close(out, t([1.5, 1.5]))
    out_scalar = merge.task_arithmetic(base, [t([1.0, 0.0]), t([0.0, 2.0])], 0.5)
    assert_close(out_scalar, t([1.5, 2.0]))


def test_slerp_task_vectors_and_liti():
    init = t([1.0, 1.0])
    a, b = init + t([1.0, 0.0]), init + t([0.0, 1.0])
    merged = merge.slerp_task_vectors(init, a, b, 0.5)
    s = 1 / math.sqrt(2)
    assert_close(merged, t([1.0 + s, 1.0 + s]))
    assert_close(merge.liti(init, merged, 0.3), t([1.0 + 0.3 * s, 1.0 + 0.3 * s]))
    assert_close(merge.liti(t([0.0]), t([10.0]), 0.3), t([3.0]))
    assert_close(merge.liti(init, merged, 0.0), init)


# --- TIES / DARE ------------------------------------------------------------------

TAU1 = [[1.0, -2.0, 0.5], [0.1, 3.0, -0.2]]
TAU2 = [[-0.5, -1.0, 2.0], [0.3, -4.0, 0.05]]


def test_ties_2x3_by_hand():
    # density 0.5 keeps 3 of 6 entries per task vector:
    #   trim(tau1) = [[1, -2, 0], [0, 3, 0]]     trim(tau2) = [[0, -1, 2], [0, -4, 0]]
    # elected sign of the sum [[1, -3, 2], [0, -1, 0]] = [[+, -, +], [0, -, 0]]
    # disjoint mean over agreeing non-zeros: [[1, -1.5, 2], [0, -4, 0]]
    base = torch.ones(2, 3)
    out = merge.ties(base, [t(TAU1), t(TAU2)], [1.0, 1.0], density=0.5)
    assert_close(out, base + t([[1.0, -1.5, 2.0], [0.0, -4.0, 0.0]]))
    out_scaled = merge.ties(base, [t(TAU1), t(TAU2)], [1.0, 1.0], density=0.5, scale=0.5)
    assert_close(out_scaled, base + 0.5 * t([[1.0, -1.5, 2.0], [0.0, -4.0, 0.0]]))


def test_ties_weights_change_election_by_hand():
    # weights [2, 1]: weighted trims [[2, -4, 0], [0, 6, 0]] and [[0, -1, 2], [0, -4, 0]]
    # sum [[2, -5, 2], [0, 2, 0]] -> sign at (1,1) flips to +, only tau1 agrees there
    # weighted mean: (0,1) = (-4 - 1) / (2 + 1); (1,1) = 6 / 2
    out = merge.ties(torch.zeros(2, 3), [t(TAU1), t(TAU2)], [2.0, 1.0], density=0.5)
    assert_close(out, t([[1.0, -5.0 / 3.0, 2.0], [0.0, 3.0, 0.0]]))


def test_dare_deterministic_rescaled_and_unbiased():
    tau = torch.full((200_000,), 2.0)
    out1 = merge.dare(tau, 0.3, torch.Generator().manual_seed(0))
    out2 = merge.dare(tau, 0.3, torch.Generator().manual_seed(0))
    out3 = merge.dare(tau, 0.3, torch.Generator().manual_seed(1))
    assert torch.equal(out1, out2)
    assert not torch.equal(out1, out3)
    kept = out1 != 0
    assert_close(out1[kept], torch.full((int(kept.sum()),), 2.0 / 0.3))  # rescaled by 1/density
    assert abs((~kept).float().mean().item() - 0.7) < 0.005  # drop fraction = 1 - density
    assert abs(out1.mean().item() - 2.0) < 0.03  # expectation preserved
    assert torch.equal(merge.dare(tau, 1.0), tau)
    with pytest.raises(ValueError):
        merge.dare(tau, 0.0)
