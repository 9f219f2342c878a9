import pytest
import torch

from egrpo.grpo import grouped_zscore, kl_to_reference, per_reward_advantages, ppo_clip_loss, transition_advantages


def test_group_z_scores_are_computed_within_each_group():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 10.0, 14.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    adv = transition_advantages(rewards, torch.arange(8)[:, None], groups, "mean", clip=5.0)
    first = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert torch.allclose(adv[:4], (first - 2.5) / first.std(unbiased=False), atol=1e-6)
    assert adv[7] == pytest.approx(3**0.5, abs=1e-5)
    assert torch.allclose(adv.reshape(2, 4).mean(-1), torch.zeros(2), atol=1e-6)


def test_groups_need_not_be_contiguous():
    values = torch.tensor([[1.0], [5.0], [3.0], [7.0]])
    z = grouped_zscore(values, torch.tensor([3, 8, 3, 8]))
    assert torch.allclose(z.squeeze(1), torch.tensor([-1.0, -1.0, 1.0, 1.0]), atol=1e-6)


def test_advantages_are_clipped_and_constant_groups_give_zero():
    rewards = torch.cat([torch.tensor([0.0] * 99 + [1.0]), torch.full((100,), 0.5)])
    groups = torch.arange(200) // 100
    adv = transition_advantages(rewards, torch.arange(200)[:, None], groups, "mean", clip=5.0)
    assert adv.max().item() == 5.0
    assert torch.all(adv[100:] == 0)


def test_subtree_rewards_are_leaf_means_and_granularities_sum_their_z_scores():
    finals = torch.tensor([1.0, 3.0, 2.0, 6.0])
    # Two nodes, each over two leaves: rewards 2 and 4 -> z = -1, +1.
    tree = transition_advantages(finals, torch.tensor([[0, 1], [2, 3]]), torch.tensor([0, 0]), "mean", clip=5.0)
    assert torch.allclose(tree, torch.tensor([-1.0, 1.0]))
    # Same leaves read as two granularity columns: z of (1, 2) plus z of (3, 6) -> -2, +2.
    g2 = transition_advantages(finals, torch.tensor([[0, 1], [2, 3]]), torch.tensor([0, 0]), "sum_z", clip=5.0)
    assert torch.allclose(g2, torch.tensor([-2.0, 2.0]))


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


def test_per_reward_normalisation_is_blind_to_each_rewards_scale():
    g = torch.Generator().manual_seed(0)
    leaves, groups = torch.arange(12)[:, None], torch.arange(12) // 4
    a, b = torch.randn(12, generator=g), torch.rand(12, generator=g)
    weights = {"a": 1.0, "b": 0.5, "unused": 0.0}
    adv = per_reward_advantages({"a": a, "b": b, "unused": b}, weights, leaves, groups, "mean", clip=5.0)
    expected = transition_advantages(a, leaves, groups, "mean", 99)
    expected = expected + 0.5 * transition_advantages(b, leaves, groups, "mean", 99)
    assert torch.allclose(adv, expected, atol=1e-6)
    # Scaling or shifting one reward leaves the advantages alone (a weighted total would be dominated by it).
    scaled = per_reward_advantages({"a": 100 * a - 3, "b": b, "unused": b}, weights, leaves, groups, "mean", clip=5.0)
    assert torch.allclose(adv, scaled, atol=1e-5)
    # With one reward it is the ordinary group z-score.
    single = per_reward_advantages({"a": a}, {"a": 1.0}, leaves, groups, "mean", clip=5.0)
    assert torch.equal(single, transition_advantages(a, leaves, groups, "mean", clip=5.0))
