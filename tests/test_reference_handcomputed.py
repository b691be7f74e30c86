"""CPPO on a 6-token sequence, derived by hand step by step (docs/math.md section 3), against the reference.

Shared data: mu_t = 0.5 everywhere, pi = [0.60, 0.62, 0.45, 0.51, 0.52, 0.69], so
    D_t = |pi_t - mu_t| = [0.10, 0.12, 0.05, 0.01, 0.02, 0.19]     (binary TV)
    r_t = pi_t / mu_t   = [1.20, 1.24, 0.90, 1.02, 1.04, 1.38]
delta = 0.15, w_min = 0.8, length_mode "sequence": T_w = 6, w_t = 1 - 0.2 (t - 1) / 5
    w_t      = [1.00, 0.96, 0.92, 0.88, 0.84, 0.80]
    w_t D_t  = [0.1000, 0.1152, 0.0460, 0.0088, 0.0168, 0.1520]
Exclusive prefix sums (every valid token counts, kept or not):
    W_{t-1}  = [0, 1.00, 1.96, 2.88, 3.76, 4.60]
    S_{t-1}  = [0, 0.1000, 0.2152, 0.2612, 0.2700, 0.2868]
Row 0 has A = +1 (token 3 moves toward mu: pi < mu), row 1 has A = -1 (tokens 1, 2, 4, 5, 6 move toward mu).
Row 1 is padded to width 8; its last two positions are masked and hold garbage.
"""

import math

import pytest
import torch

from ptr_kernels import PolicyLossConfig, policy_loss
from ptr_kernels.reference import token_terms

MU = 0.5
PI = [0.60, 0.62, 0.45, 0.51, 0.52, 0.69]
R = [p / MU for p in PI]
WEIGHTS = [1.00, 0.96, 0.92, 0.88, 0.84, 0.80]


def batch():
    """[2, 8]: the same 6 tokens twice (A = +1, A = -1), then two masked positions of garbage."""
    lp = torch.tensor([[math.log(p) for p in PI] + [float("nan"), float("inf")]] * 2, dtype=torch.float64)
    olp = torch.tensor([[math.log(MU)] * 6 + [float("-inf"), 3.0]] * 2, dtype=torch.float64)
    mask = torch.tensor([[1] * 6 + [0, 0]] * 2, dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    return lp, olp, adv, mask


def run(**cfg):
    lp, olp, adv, mask = batch()
    config = PolicyLossConfig(method="cppo", delta=0.15, w_min=0.8, **cfg)
    terms = token_terms(lp, olp, adv, mask, config)
    lp = lp.requires_grad_(True)
    loss, metrics = policy_loss(lp, olp, adv, mask, config=config, backend="reference")
    (grad,) = torch.autograd.grad(loss, lp)
    return terms, loss.item(), {k: v.item() for k, v in metrics.items()}, grad


def close(actual, expected):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-14)


def test_hard_gate_fixed_budget():
    # delta_b = 0.05 fixed. c_t = min(0.15, 0.15 + 0.05 W_{t-1} - S_{t-1}):
    #   t1: min(.15, .15)                        = .1500   w D = .1000 <= .1500 inside
    #   t2: min(.15, .15 + .0500 - .1000 = .100) = .1000   w D = .1152 >  .1000 outside (budget: .1152 <= delta)
    #   t3: min(.15, .15 + .0980 - .2152)        = .0328   w D = .0460 >  .0328 outside (budget)
    #   t4: min(.15, .15 + .1440 - .2612)        = .0328   w D = .0088 <= .0328 inside
    #   t5: min(.15, .15 + .1880 - .2700)        = .0680   w D = .0168 <= .0680 inside
    #   t6: min(.15, .15 + .2300 - .2868)        = .0932   w D = .1520 >  .15   outside (token threshold)
    # Row 0 (A = +1): token 3 is kept anyway (toward mu) -> M = [1, 0, 1, 1, 1, 0]
    # Row 1 (A = -1): only token 3 moves away           -> M = [1, 1, 0, 1, 1, 1]
    terms, loss, metrics, grad = run(delta_b=0.05, delta_b_quantile=None)
    close(terms.weight[:, :6], [WEIGHTS, WEIGHTS])
    thresholds = [0.15, 0.10, 0.0328, 0.0328, 0.068, 0.0932]
    close(terms.threshold[:, :6], [thresholds, thresholds])
    close(terms.delta_b, [0.05, 0.05])
    gates = [[1, 0, 1, 1, 1, 0], [1, 1, 0, 1, 1, 1]]
    close(terms.gate[:, :6], gates)
    assert terms.gate[:, 6:].eq(0).all()
    # token-mean over 12 tokens: row 0 sum -A r M = -(1.20 + 0.90 + 1.02 + 1.04) = -4.16,
    # row 1 sum = +(1.20 + 1.24 + 1.02 + 1.04 + 1.38) = 5.88  -> loss = 1.72 / 12
    close(loss, (-4.16 + 5.88) / 12)
    # d loss / d log_prob_t = -A r_t M_t / 12
    expected = [[-R[t] * gates[0][t] / 12 for t in range(6)] + [0, 0],
                [R[t] * gates[1][t] / 12 for t in range(6)] + [0, 0]]
    close(grad, expected)
    # rejected: row 0 t2 (budget), t6 (token); row 1 t3 (budget) -> 3 / 12, token 1 / 12, budget 2 / 12
    close([metrics["mask_frac"], metrics["mask_frac_token"], metrics["mask_frac_budget"]], [3 / 12, 1 / 12, 2 / 12])
    close(metrics["divergence_mean"], 0.49 / 6)
    close(metrics["ppo_kl"], sum(math.log(MU / p) for p in PI) / 6)
    close(metrics["delta_b_mean"], 0.05)


def test_soft_gate_fixed_budget():
    # g_t = min(1, 1/z_t), z_t = max(w D / 0.15, S_t / (0.15 + 0.05 W_{t-1})) with S_t including t:
    #   S_t         = [.1000, .2152, .2612, .2700, .2868, .4388]
    #   denominator = [.150, .200, .248, .294, .338, .380]
    #   t1: max(.667, .667) -> 1;  t2: max(.768, 1.076) -> .2 / .2152;  t3 (row 0: toward) -> 1;
    #   t4: max(.059, .918) -> 1;  t5: max(.112, .849) -> 1;  t6: max(1.013, 1.155) -> .38 / .4388
    # Row 1 (A = -1): every token except t3 is toward mu -> 1; t3: max(.307, .2612 / .248 = 1.053) -> .248 / .2612
    terms, loss, metrics, grad = run(delta_b=0.05, delta_b_quantile=None, gate="soft")
    g0 = [1, 0.2 / 0.2152, 1, 1, 1, 0.38 / 0.4388]
    g1 = [1, 1, 0.248 / 0.2612, 1, 1, 1]
    close(terms.gate[:, :6], [g0, g1])
    close(loss, (-sum(r * g for r, g in zip(R, g0)) + sum(r * g for r, g in zip(R, g1))) / 12)
    close(grad[:, :6], [[-r * g / 12 for r, g in zip(R, g0)], [r * g / 12 for r, g in zip(R, g1)]])
    # mask_frac counts the tokens the hard gate would reject (those with g_t < 1): same 3 / 12
    close(metrics["mask_frac"], 3 / 12)


def test_hard_gate_calibrated_budget():
    # delta_b = 0.10, q = 0.9, cap 2 x 0.10. Sorted D = [.01, .02, .05, .10, .12, .19];
    # Quantile_0.9: position 0.9 * 5 = 4.5 -> .12 + 0.5 (.19 - .12) = .155; delta_b_i = min(.20, max(.10, .155)) = .155
    # c_t = min(.15, .15 + .155 W_{t-1} - S_{t-1}): t2: .205, t3: .2386, t4: .3352, t5: .4628, t6: .5762 -> all .15
    # Only the token threshold binds: row 0 rejects t6 (.152 > .15), row 1 rejects nothing (t3: .046 <= .15)
    terms, loss, metrics, grad = run(delta_b=0.10, delta_b_quantile=0.9, delta_b_max_mult=2.0)
    close(terms.delta_b, [0.155, 0.155])
    close(terms.threshold[:, :6], [[0.15] * 6] * 2)
    close(terms.gate[:, :6], [[1, 1, 1, 1, 1, 0], [1] * 6])
    close(loss, (-(1.20 + 1.24 + 0.90 + 1.02 + 1.04) + sum(R)) / 12)
    close([metrics["mask_frac"], metrics["mask_frac_token"], metrics["mask_frac_budget"]], [1 / 12, 1 / 12, 0.0])
    close(metrics["delta_b_mean"], 0.155)


@pytest.mark.parametrize("delta_b,q,expected", [
    (0.10, 0.5, 0.10),  # Quantile_0.5 at position 2.5: .05 + .5 (.10 - .05) = .075 -> floor delta_b = .10
    (0.05, 0.9, 0.10),  # .155 -> cap 2 x .05 = .10
    (0.10, 1.0, 0.19),  # the maximum .19, inside [.10, .20]
    (0.10, 0.0, 0.10),  # the minimum .01 -> floor
])
def test_calibrated_budget_floor_and_cap(delta_b, q, expected):
    terms, *_ = run(delta_b=delta_b, delta_b_quantile=q, delta_b_max_mult=2.0)
    close(terms.delta_b, [expected, expected])
