"""SFT / PRM / ORM losses on hand-built tensors, against values derived by hand (ln 2, ln 4/3, ...)."""

from __future__ import annotations

import math

import pytest
import torch

from pipelines import losses

LN2, LN43 = math.log(2), math.log(4 / 3)


def _logits_for(rows: list[list[list[float]]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32, requires_grad=True)


def test_sft_uniform_logits_give_log_vocab():
    logits = torch.zeros(2, 5, 7, requires_grad=True)  # (B, T, V)
    ids = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    assert losses.sft_loss(logits, ids, mask).item() == pytest.approx(math.log(7))


def test_sft_reads_the_mask_at_the_target_position():
    # V=2. Position 0 predicts token 1 with p = 3/4 (logits 0, ln 3): nll ln 4/3.
    # Position 1 predicts token 0 with p = 1/2 (logits 0, 0): nll ln 2. Position 2 predicts nothing.
    logits = _logits_for([[[0.0, math.log(3)], [0.0, 0.0], [5.0, -5.0]]])
    ids = torch.tensor([[0, 1, 0]])
    both = losses.sft_loss(logits, ids, torch.tensor([[0, 1, 1]]))
    assert both.item() == pytest.approx((LN43 + LN2) / 2)
    only_last = losses.sft_loss(logits, ids, torch.tensor([[0, 0, 1]]))
    assert only_last.item() == pytest.approx(LN2)
    # the prompt position's logits never matter: change them, the loss stays
    logits2 = logits.detach().clone()
    logits2[0, 0] = torch.tensor([9.0, -9.0])
    assert losses.sft_loss(logits2, ids, torch.tensor([[0, 0, 1]])).item() == pytest.approx(LN2)


def test_sft_weights_are_a_weighted_token_mean():
    # row 0: one target token with nll ln 2; row 1: two target tokens with nll ln 4/3 each
    logits = _logits_for([[[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]],
                          [[0.0, math.log(3)], [0.0, math.log(3)], [0.0, 0.0]]])
    ids = torch.tensor([[0, 0, 1], [0, 1, 1]])
    mask = torch.tensor([[0, 0, 1], [0, 1, 1]])
    w = torch.tensor([3.0, 1.0])
    expected = (3 * LN2 + 1 * 2 * LN43) / (3 * 1 + 1 * 2)
    assert losses.sft_loss(logits, ids, mask, w).item() == pytest.approx(expected)
    # scale-free: only weight ratios matter
    assert losses.sft_loss(logits, ids, mask, w * 10).item() == pytest.approx(expected)
    assert losses.sft_loss(logits, ids, mask).item() == pytest.approx((LN2 + 2 * LN43) / 3)


def test_sft_gradient_is_softmax_minus_onehot_over_count():
    logits = torch.randn(1, 4, 5, requires_grad=True)
    ids = torch.tensor([[1, 2, 3, 4]])
    mask = torch.tensor([[0, 1, 1, 0]])  # targets 2 and 3, read at positions 0 and 1
    losses.sft_loss(logits, ids, mask).backward()
    p = torch.softmax(logits.detach(), -1)
    expected = torch.zeros_like(p)
    for pos, tgt in ((0, 2), (1, 3)):
        expected[0, pos] = p[0, pos]
        expected[0, pos, tgt] -= 1
    assert torch.allclose(logits.grad, expected / 2, atol=1e-6)


def test_empty_masks_give_a_connected_zero():
    logits = torch.randn(1, 3, 4, requires_grad=True)
    loss = losses.sft_loss(logits, torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3))
    assert loss.item() == 0.0
    loss.backward()  # DDP needs every rank to run backward even on an empty batch
    assert logits.grad is not None and float(logits.grad.abs().sum()) == 0.0
    s = torch.randn(2, 3, requires_grad=True)
    loss = losses.prm_loss(s, torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()


@pytest.mark.parametrize("logit, target, expected", [
    (0.0, 1.0, LN2), (0.0, 0.0, LN2), (0.0, 0.3, LN2),  # p = 1/2: ln 2 whatever the target
    (math.log(3), 1.0, -math.log(0.75)),  # p = 3/4
    (math.log(3), 0.0, -math.log(0.25)),
    (math.log(3), 0.5, -(0.5 * math.log(0.75) + 0.5 * math.log(0.25))),  # a soft target
])
def test_bce_soft_and_hard_targets(logit, target, expected):
    got = losses.bce_loss(torch.tensor([[logit]]), torch.tensor([[target]]), torch.tensor([[True]]))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_prm_loss_averages_labelled_steps_only_and_ignores_nan():
    # (B=2, S=3): row 0 has steps 0,1 labelled, row 1 step 0 only; NaN targets sit under the mask
    step_logits = torch.tensor([[0.0, math.log(3), 7.0], [math.log(3), 0.0, 0.0]])
    targets = torch.tensor([[1.0, 1.0, float("nan")], [0.0, float("nan"), float("nan")]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    expected = (LN2 - math.log(0.75) - math.log(0.25)) / 3
    got = losses.prm_loss(step_logits, targets, mask)
    assert not torch.isnan(got)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_prm_loss_per_sequence_weights():
    step_logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])
    targets = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    w = torch.tensor([1.0, 2.0])
    expected = (1 * (LN2 + LN2) + 2 * -math.log(0.75)) / (1 * 2 + 2 * 1)
    assert losses.prm_loss(step_logits, targets, mask, w).item() == pytest.approx(expected, rel=1e-6)


def test_orm_loss():
    logits = torch.tensor([math.log(3), -math.log(3)])
    assert losses.orm_loss(logits, torch.tensor([1.0, 0.0])).item() == pytest.approx(-math.log(0.75))
    assert losses.orm_loss(logits, torch.tensor([0.0, 1.0])).item() == pytest.approx(-math.log(0.25))


def test_gather_positions_and_last_positions():
    values = torch.arange(12, dtype=torch.float32).reshape(2, 6)  # (B, T)
    picked, mask = losses.gather_positions(values, torch.tensor([[1, 4, -1], [0, -1, -1]]))
    assert mask.tolist() == [[True, True, False], [True, False, False]]
    assert picked[mask].tolist() == [1.0, 4.0, 6.0]
    attention = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    assert losses.last_positions(attention).tolist() == [2, 5]


def test_sequence_logps_sums_the_target_tokens_log_probabilities():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)  # (B, T, V)
    ids = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])  # targets: completion tokens only
    got = losses.sequence_logps(logits, ids, mask)
    logp = torch.log_softmax(logits, -1)
    want = [sum(logp[b, t - 1, ids[b, t]].item() for t in range(1, 5) if mask[b, t]) for b in range(2)]
    assert got.tolist() == pytest.approx(want, abs=1e-5)


def test_dpo_loss_is_log2_at_the_reference_and_falls_as_the_chosen_ratio_grows():
    zero = torch.zeros(3)
    assert losses.dpo_loss(zero, zero, zero, zero, beta=0.1).item() == pytest.approx(math.log(2))
    chosen = torch.zeros(3, requires_grad=True)
    loss = losses.dpo_loss(chosen, zero, zero, zero, beta=0.5)
    loss.backward()
    assert (chosen.grad < 0).all()  # raising the chosen solution's likelihood lowers the loss
    # weights: a zero-weight pair does not count; the reference side carries no gradient
    policy, ref = torch.zeros(3, requires_grad=True), torch.tensor([5.0, 0.0, 0.0], requires_grad=True)
    w = losses.dpo_loss(policy, zero, ref, zero, beta=1.0, weights=torch.tensor([0.0, 1.0, 1.0]))
    assert w.item() == pytest.approx(math.log(2))
    w.backward()
    assert ref.grad is None and policy.grad[0] == 0 and (policy.grad[1:] < 0).all()
