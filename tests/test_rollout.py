import torch

from egrpo.embedded.assets import load_base_policy
from egrpo.planner import make_plan
from egrpo.rollout import rollout, sample_images
from egrpo.stepmath import gaussian_log_prob, sde_distribution

PROMPTS = ["a handwritten digit four", "someone wrote the number nine"]


def _rollout(plan, group=5, seed=0):
    policy = load_base_policy()
    cond = policy.encode(PROMPTS)
    return policy, cond, rollout(policy, plan, cond, group, torch.Generator().manual_seed(seed))


def test_shapes_and_shared_initial_noise():
    plan = make_plan()
    policy, cond, batch = _rollout(plan)
    p, k, g = 2, len(plan.branches), 5
    assert batch.anchor.shape == (p, 17, 16, 4)
    assert batch.samples.shape == batch.final.shape == (p, k, g, 16, 4)
    assert batch.log_probs.shape == (p, k, g)
    assert torch.equal(batch.branch_inputs, batch.anchor[:, plan.active_steps])
    calls = sum(plan.network_calls_per_prompt(g)[key] for key in ("anchor", "branch_completion")) * p
    assert batch.network_calls == calls


def test_all_samples_of_a_group_share_their_input_bit_for_bit():
    """One policy evaluation on the group's anchor latent reproduces every member's log-prob exactly."""
    plan = make_plan()
    policy, cond, batch = _rollout(plan)
    sigmas = plan.sigmas
    with torch.no_grad():
        for j, branch in enumerate(plan.branches):
            x_in = batch.branch_inputs[:, j]
            v = policy.velocity(x_in, sigmas[branch.step].float().expand(2), cond)
            mean, std = sde_distribution(x_in, v, sigmas[branch.step].expand(2), sigmas[branch.landing].expand(2), 0.7, float(sigmas[1]))
            for p in range(2):
                lp = gaussian_log_prob(batch.samples[p, j], mean[p : p + 1].expand(5, 16, 4), std[p].expand(5))
                assert torch.equal(lp, batch.log_probs[p, j])
            # Distinct noise per member: the samples differ.
            assert not torch.equal(batch.samples[0, j, 0], batch.samples[0, j, 1])


def test_without_noise_every_branch_lands_on_the_anchor_image():
    plan = make_plan(eta=0.0, tau=0.0)
    policy, cond, batch = _rollout(plan, group=3)
    anchor_final = batch.anchor_final[:, None, None].expand_as(batch.final)
    assert torch.allclose(batch.final, anchor_final, atol=1e-5)
    images = sample_images(policy, cond, batch.anchor[:, 0], plan.sigmas)
    assert torch.allclose(images, policy.decode(batch.anchor_final), atol=1e-5)


def test_rollout_is_reproducible_from_the_generator():
    plan = make_plan()
    _, _, a = _rollout(plan, seed=3)
    _, _, b = _rollout(plan, seed=3)
    assert torch.equal(a.final, b.final) and torch.equal(a.log_probs, b.log_probs)


def test_chunked_network_calls_give_the_same_rollout():
    plan = make_plan(active_steps="first:3")
    policy = load_base_policy()
    cond = policy.encode(PROMPTS)
    whole = rollout(policy, plan, cond, 4, torch.Generator().manual_seed(0), max_batch=1024)
    chunked = rollout(policy, plan, cond, 4, torch.Generator().manual_seed(0), max_batch=5)
    assert torch.allclose(whole.final, chunked.final, atol=1e-5)
