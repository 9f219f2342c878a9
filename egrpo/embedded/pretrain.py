"""``egrpo pretrain``: builds the embedded task's base policy and reward networks from scratch.

The base policy is trained by flow matching for a deliberately short budget, so its prompt
alignment sits well below the ceiling (around 60%) and leaves headroom for RL. The reward
classifier and the judge are trained on disjoint halves of the digits; the quality density is a
Gaussian mixture fitted to all of them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from egrpo.embedded.digits import digit_of, load_digits, train_prompts
from egrpo.embedded.model import DigitsPolicy, TinyFluxConfig, pack
from egrpo.embedded.networks import DigitClassifier, DigitDensity


def train_classifier(images: torch.Tensor, labels: torch.Tensor, seed: int, steps: int = 1500) -> DigitClassifier:
    """A CNN trained with shifts and pixel noise, so it also reads imperfect generated digits."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1))
    for _ in range(steps):
        idx = torch.randint(len(images), (128,), generator=gen)
        dx, dy = torch.randint(0, 3, (2,), generator=gen).tolist()
        batch = padded[idx, :, dy : dy + 8, dx : dx + 8]
        batch = (batch + 0.1 * torch.randn(batch.shape, generator=gen)).clamp(0, 1)
        loss = torch.nn.functional.cross_entropy(model(batch), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def fit_density(images: torch.Tensor, seed: int, components: int = 10) -> DigitDensity:
    from sklearn.mixture import GaussianMixture

    x = images.flatten(1).double().numpy()
    gmm = GaussianMixture(components, covariance_type="full", reg_covar=1e-2, random_state=seed).fit(x)
    density = DigitDensity(components, x.shape[1])
    density.log_weights.copy_(torch.log(torch.tensor(gmm.weights_)))
    density.means.copy_(torch.tensor(gmm.means_))
    density.precision_chol.copy_(torch.tensor(gmm.precisions_cholesky_))
    ll = density.log_likelihood(images)
    density.real_mean.fill_(ll.mean())
    density.real_std.fill_(ll.std())
    return density


def train_base_policy(
    images: torch.Tensor, labels: torch.Tensor, steps: int, seed: int, config: TinyFluxConfig | None = None
) -> DigitsPolicy:
    """Rectified-flow training: x_sigma = (1 - sigma) x0 + sigma eps, target v = eps - x0, logit-normal sigma."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    policy = DigitsPolicy(config)
    prompts = train_prompts()
    by_digit = [[p for p in prompts if digit_of(p) == d] for d in range(10)]
    cond_all = policy.encode(prompts)
    prompt_index = {p: i for i, p in enumerate(prompts)}
    latents = pack(images)
    opt = torch.optim.AdamW(policy.model.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(steps):
        idx = torch.randint(len(images), (64,), generator=gen)
        choice = torch.randint(len(by_digit[0]), (64,), generator=gen)
        rows = torch.tensor([prompt_index[by_digit[int(labels[i])][int(c)]] for i, c in zip(idx, choice)])
        x0 = latents[idx]
        eps = torch.randn(x0.shape, generator=gen)
        sigma = torch.sigmoid(torch.randn(64, generator=gen))
        xt = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * eps
        v = policy.velocity(xt, sigma, {k: t[rows] for k, t in cond_all.items()})
        loss = torch.nn.functional.mse_loss(v, eps - x0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return policy


def pretrain(out_dir: Path, flow_steps: int = 300, seed: int = 0) -> dict[str, Path]:
    """Writes ``digits_base.safetensors`` and ``digits_rewards.safetensors`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images, labels = load_digits()
    half = torch.arange(len(images)) % 2 == 0
    classifier = train_classifier(images[half], labels[half], seed)
    judge = train_classifier(images[~half], labels[~half], seed + 1)
    density = fit_density(images, seed)
    rewards = {}
    for name, module in (("classifier", classifier), ("judge", judge), ("density", density)):
        rewards.update({f"{name}.{k}": v.contiguous() for k, v in module.state_dict().items()})
    reward_path = out_dir / "digits_rewards.safetensors"
    save_file(rewards, str(reward_path))

    policy = train_base_policy(images, labels, flow_steps, seed)
    base_path = out_dir / "digits_base.safetensors"
    meta = {"arch": json.dumps(policy.arch_config()), "flow_steps": str(flow_steps), "seed": str(seed)}
    save_file({k: v.contiguous() for k, v in policy.model.state_dict().items()}, str(base_path), metadata=meta)
    return {"base": base_path, "rewards": reward_path}
