import pytest
import torch

from egrpo.grpo import group_advantages, kl_to_reference, ppo_clip_loss


def test_group_z_scores_are_computed_within_each_group():
    rewards = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [10.0, 10.0, 10.0, 14.0]]])
    adv = group_advantages(rewards, clip=5.0)
    first = (torch.tensor([1.0, 2.0, 3.0, 4.0]) - 2.5) / torch.tensor([1.0, 2.0, 3.0, 4.0]).std(unbiased=False)
    assert torch.allclose(adv[0, 0], first, atol=1e-6)
    assert torch.allclose(adv.mean(-1), torch.zeros(1, 2), atol=1e-6)
    assert adv[0, 1, 3] == pytest.approx(3 ** 0.5, abs=1e-5)


def test_advantages_are_clipped_and_constant_groups_give_zero():
    rewards = torch.tensor([[0.0] * 99 + [1.0], [0.5] * 100])
    adv = group_advantages(rewards, clip=5.0)
    assert adv.max().item() == 5.0
    assert torch.all(adv[1] == 0)


def test_ppo_loss_at_ratio_one_is_minus_mean_advantage_and_clips_outside():
    adv = torch.tensor([1.0, -2.0, 0.5])
    old = torch.zeros(3)
    new = torch.zeros(3, requires_grad=True)
    loss, stats = ppo_clip_loss(new, old, adv, clip_range=0.1)
    assert loss.item() == pytest.approx(-adv.mean().item())
    assert stats["ratio_mean"] == 1.0 and stats["clip_fraction"] == 0.0
    loss.backward()
    assert torch.allclose(new.grad, -adv / 3)
    # Ratio beyond 1 + eps with a positive advantage: the clipped branch wins, no gradient.
    far = torch.tensor([0.5, 0.0, 0.0], requires_grad=True)
    loss, stats = ppo_clip_loss(far, old, adv, clip_range=0.1)
    loss.backward()
    assert far.grad[0] == 0.0
    assert stats["clip_fraction"] == pytest.approx(1 / 3)


def test_kl_to_reference_closed_form():
    mean = torch.ones(2, 4)
    ref = torch.zeros(2, 4)
    std = torch.tensor([1.0, 2.0])
    assert kl_to_reference(mean, ref, std).item() == pytest.approx((0.5 + 0.125) / 2)
