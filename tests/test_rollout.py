import torch

from egrpo.embedded.assets import load_base_policy
from egrpo.planner import make_plan
from egrpo.rollout import rollout_branches, sample_images
from egrpo.stepmath import gaussian_log_prob, sde_distribution

PROMPTS = ["a handwritten digit four", "someone wrote the number nine"]


def _rollout(plan, group=5, seed=0, **kwargs):
    policy = load_base_policy()
    cond = policy.encode(PROMPTS)
    gens = [torch.Generator().manual_seed(seed * 10 + i) for i in range(len(PROMPTS))]
    return policy, cond, rollout_branches(policy, plan, cond, group, gens, **kwargs)


def test_shapes_groups_and_network_calls():
    plan = make_plan()
    policy, cond, ro = _rollout(plan)
    p, k, g = 2, len(plan.branches), 5
    assert ro.finals.shape == (p * k * g, 16, 4)
    assert ro.anchor_finals.shape == (p, 16, 4)
    assert [ts.step for ts in ro.train_steps] == plan.active_steps
    for ts, branch in zip(ro.train_steps, plan.branches):
        assert ts.landing == branch.landing
        assert ts.inputs.shape == (p, 16, 4)  # one policy input per prompt: the group shares it
        assert ts.samples.shape == (p * g, 16, 4)
        assert ts.groups.tolist() == [0] * g + [1] * g
    # the anchor's T steps, then each branch member's ODE completion from where its jump lands
    assert ro.network_calls == p * (plan.num_steps + g * sum(plan.num_steps - b.landing for b in plan.branches))


def test_all_samples_of_a_group_share_their_input_bit_for_bit():
    """One policy evaluation on the group's anchor latent reproduces every member's log-prob exactly."""
    plan = make_plan()
    policy, cond, ro = _rollout(plan)
    sigmas = plan.sigmas
    with torch.no_grad():
        for ts in ro.train_steps:
            s_from, s_to = sigmas[ts.step].expand(2), sigmas[ts.landing].expand(2)
            v = policy.velocity(ts.inputs, s_from.float(), cond)
            mean, std = sde_distribution(ts.inputs, v, s_from, s_to, 0.7, float(sigmas[1]))
            lp = gaussian_log_prob(ts.samples, mean[ts.source], std[ts.source])
            assert torch.equal(lp, ts.log_probs)
            assert not torch.equal(ts.samples[0], ts.samples[1])  # distinct noise per member


def test_without_noise_every_branch_lands_on_the_anchor_image():
    plan = make_plan(eta=0.0, tau=0.0)
    policy, cond, ro = _rollout(plan, group=3)
    expected = ro.anchor_finals[ro.final_rows]
    assert torch.allclose(ro.finals, expected, atol=1e-5)
    noise = torch.cat([torch.randn(1, 16, 4, generator=torch.Generator().manual_seed(i)) for i in (0, 1)])
    images = sample_images(policy, cond, noise, plan.sigmas)
    assert torch.allclose(images, policy.decode(ro.anchor_finals), atol=1e-5)


def test_rollout_is_reproducible_from_the_generator():
    plan = make_plan()
    _, _, a = _rollout(plan, seed=3)
    _, _, b = _rollout(plan, seed=3)
    assert torch.equal(a.finals, b.finals)
    assert all(torch.equal(x.log_probs, y.log_probs) for x, y in zip(a.train_steps, b.train_steps))


def test_chunked_network_calls_give_the_same_rollout():
    plan = make_plan(active_steps="first:3")
    _, _, whole = _rollout(plan, group=4, max_batch=1024)
    _, _, chunked = _rollout(plan, group=4, max_batch=5)
    assert torch.allclose(whole.finals, chunked.finals, atol=1e-5)


def test_a_prompt_rolls_out_the_same_alone_or_in_a_batch():
    plan = make_plan(active_steps="first:3")
    policy = load_base_policy()
    cond = policy.encode(PROMPTS)
    both = rollout_branches(policy, plan, cond, 4, [torch.Generator().manual_seed(i) for i in (5, 6)])
    alone = rollout_branches(policy, plan, {k: v[1:] for k, v in cond.items()}, 4, [torch.Generator().manual_seed(6)])
    second = both.final_rows == 1
    assert torch.allclose(both.finals[second], alone.finals, atol=1e-5)


def test_coarser_granularity_completes_with_fewer_calls():
    plan = make_plan(tau=0.0, active_steps="first:2")
    _, _, fine = _rollout(plan, group=2)
    _, _, both = _rollout(plan, group=2, granularities=(1, 2))
    # Completions from landings 1 and 2 (15 and 14 steps left): stride 2 adds ceil(15/2) + ceil(14/2) = 15 per sample.
    assert both.network_calls - fine.network_calls == 2 * 2 * 15
    assert both.finals.shape[0] == 2 * fine.finals.shape[0]
    assert both.reduce == "sum_z"
