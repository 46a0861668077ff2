"""GRPO's pure parts: group advantages, the clipped surrogate with the KL term, the token log-probabilities it reads,
the rows and micro-batches it trains on, which problems each rank samples, and the config's refusals."""

import math

import pytest
import torch

from pipelines import losses
from pipelines.config import ConfigError, load_config
from pipelines.train.grpo import GRPOConfig, collate_rows, load_reward_fn, step_problems, training_rows


def test_group_advantages_are_normalised_within_each_group_and_zero_for_a_flat_group():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # two groups of 4
    a = losses.group_advantages(r, 4)
    mean, std = 0.25, math.sqrt(0.25 * 0.75)
    assert torch.allclose(a[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (std + 1e-4))
    assert torch.equal(a[4:], torch.zeros(4))  # every sample right: no signal
    centred = losses.group_advantages(r, 4, scale=False)
    assert torch.allclose(centred[:4], torch.tensor([1 - mean, -mean, -mean, -mean]))


def test_grpo_loss_on_policy_is_minus_the_mean_advantage_and_its_gradient_follows_the_advantage():
    logps = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.7, -0.2]], requires_grad=True)  # (B=2, T=3)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([2.0, -1.0])
    loss, parts = losses.grpo_loss(logps, logps.detach(), None, adv, mask, clip_eps=0.2, beta=0.0)
    assert math.isclose(loss.item(), -(2.0 - 1.0) / 2, abs_tol=1e-6)  # ratio 1: -mean_i A_i
    loss.backward()
    # d loss / d logp_t = -A_i / (|o_i| * B) on counted tokens, 0 on padding
    expected = torch.tensor([[-2.0 / 4, -2.0 / 4, 0.0], [1.0 / 6, 1.0 / 6, 1.0 / 6]])
    assert torch.allclose(logps.grad, expected)
    assert parts["kl"].item() == 0.0 and parts["clip_frac"].item() == 0.0


def test_grpo_loss_clips_the_ratio_and_adds_the_k3_kl_to_the_reference():
    old = torch.tensor([[-1.0, -1.0]])
    logps = torch.tensor([[-0.5, -1.0]], requires_grad=True)  # token 0: ratio e^0.5 = 1.65 > 1.2
    mask = torch.ones(1, 2)
    loss, parts = losses.grpo_loss(logps, old, None, torch.tensor([1.0]), mask, clip_eps=0.2, beta=0.0)
    loss.backward()
    assert logps.grad[0, 0].item() == 0.0  # clipped (positive advantage, ratio above 1 + eps): no gradient
    assert logps.grad[0, 1].item() < 0.0  # unclipped: raising it lowers the loss
    assert parts["clip_frac"].item() == 0.5
    ref = torch.tensor([[-1.5, -1.0]])
    loss_kl, parts = losses.grpo_loss(logps.detach(), logps.detach(), ref, torch.tensor([0.0]), mask, beta=0.1)
    d = -1.5 - (-0.5)
    k3 = math.exp(d) - d - 1  # >= 0, 0 where the policy equals the reference
    assert math.isclose(parts["kl"].item(), k3 / 2, rel_tol=1e-5)
    assert math.isclose(loss_kl.item(), 0.1 * k3 / 2, rel_tol=1e-5)


def test_token_logps_sum_to_the_sequence_logps():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    ids = torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)
    per_token = losses.token_logps(logits, ids, mask)  # (2, 4)
    assert per_token.shape == (2, 4)
    assert torch.allclose(per_token.sum(dim=1), losses.sequence_logps(logits, ids, mask))
    assert per_token[1, 2:].abs().sum() == 0  # not counted


def test_rows_keep_only_the_logits_the_loss_reads_and_match_the_full_forward(tiny_model):
    """collate_rows' `keep`: logits of the last K positions (from the shortest prompt's end) give exactly the
    log-probabilities the full forward gives at the sampled tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    groups = [[{"token_ids": [7, 8, 9]}, {"token_ids": []}], [{"token_ids": [4]}, {"token_ids": [3, 2]}]]
    rows = training_rows([list(range(5, 15)), list(range(20, 32))], groups, [1.0, 0.5, -1.0, 2.0], max_len=64)
    assert [r["advantage"] for r in rows] == [1.0, -1.0, 2.0]  # the empty sample (an engine error) is left out
    b = collate_rows(rows, 0)
    full = losses.token_logps(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                              b["input_ids"], b["loss_mask"])
    k = b["keep"]
    assert k < b["input_ids"].shape[1]
    part = losses.token_logps(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                    logits_to_keep=k).logits, b["input_ids"][:, -k:], b["loss_mask"][:, -k:])
    assert torch.allclose(full[:, 1 - k:], part, atol=1e-5)
    assert (full[:, : 1 - k] == 0).all()  # nothing counted before the kept window
    assert int(b["loss_mask"][:, 1 - k:].sum()) == 3 + 1 + 2


def test_each_rank_samples_its_own_problems_and_every_problem_comes_before_any_repeats():
    order = list(range(10))
    seen = [step_problems(order, s, r, 2, 3) for s in range(2) for r in range(2)]
    flat = [i for chunk in seen for i in chunk]
    assert sorted(flat[:10]) == order  # the first 10 draws cover every problem once
    assert step_problems(order, 0, 0, 2, 3) != step_problems(order, 0, 1, 2, 3)
    assert step_problems(order, 5, 1, 2, 3) == step_problems(order, 5, 1, 2, 3)  # a resumed run draws the same


def test_config_refuses_what_cannot_work():
    with pytest.raises(ConfigError, match="group_size"):
        load_config(GRPOConfig, overrides=["group_size=1"])
    with pytest.raises(ConfigError, match="reward_model"):
        load_config(GRPOConfig, overrides=["reward=prm"])
    with pytest.raises(ConfigError, match="reward must be"):
        load_config(GRPOConfig, overrides=["reward=bleu"])
    with pytest.raises(ConfigError, match="temperature"):
        load_config(GRPOConfig, overrides=["temperature=0"])
    with pytest.raises(ConfigError, match="cannot import"):
        load_reward_fn("tests.toy_rewards:no_such_function")
    assert load_reward_fn("tests.toy_rewards:repeat_share")({}, {"token_ids": [1, 1, 2]}) == 0.5
