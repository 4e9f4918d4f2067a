"""Each preset's loss has the gradient of its objective written out independently.

The objectives are those of docs/method.md, "Gradient estimators".
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from loopdiff.advantages import ADVANTAGE_KINDS, BATCH_ADVANTAGES, TRACKED_ADVANTAGES, leave_one_out
from loopdiff.estimators import PRESETS, loop_loss
from loopdiff.objectives import LOSS_INPUTS, LOSS_KINDS, LOSSES, loss_inputs, ppo_clip_loss, score_function_loss
from loopdiff.training.trainer import Batch
from trainer_helpers import make_trainer


def _hand_step(unet, scheduler, x_t, x_prev, t, cond, uncond, w, eta, num_steps):
    """mean, sigma and mean-reduced Gaussian log-density of one guided DDIM step, written out by hand."""
    eps_u = unet(x_t, t, encoder_hidden_states=uncond).sample
    eps_c = unet(x_t, t, encoder_hidden_states=cond).sample
    eps = eps_u + w * (eps_c - eps_u)
    abar = scheduler.alphas_cumprod
    prev = int(t) - 1000 // num_steps
    a_t = abar[int(t)].item()
    a_prev = abar[prev].item() if prev >= 0 else scheduler.final_alpha_cumprod.item()
    x0 = (x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
    mean = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * eps
    log_density = (-((x_prev - mean) ** 2) / (2 * sigma**2) - math.log(sigma) - 0.5 * math.log(2 * math.pi)).mean()
    return mean, sigma, log_density


def _hand_advantages(preset: str, rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    r = rewards.double()
    if preset == "reinforce":
        return r
    if preset == "reinforce_bc":  # fresh tracker, fewer than min_count rewards per prompt: batch mean
        return r - r.mean()
    if preset == "ppo":  # same fallback, with DDPO's std normalisation and advantage clip 5
        return ((r - r.mean()) / (r.std(unbiased=False) + 1e-6)).clamp(-5, 5)
    out = torch.empty_like(r)
    for i in range(len(r)):
        same = [j for j in range(len(r)) if groups[j] == groups[i]]
        if preset in ("rloo", "loop"):
            out[i] = r[i] - sum(r[j] for j in same if j != i) / (len(same) - 1)
        else:  # grpo
            vals = r[same]
            out[i] = (r[i] - vals.mean()) / (vals.std(unbiased=True) + 1e-4)
    return out


@pytest.mark.parametrize("preset", ["reinforce", "reinforce_bc", "rloo", "ppo", "loop", "grpo"])
def test_loss_gradient_equals_independent_objective(tmp_path, preset: str) -> None:
    trainer = make_trainer(tmp_path, preset)
    timings = {"time/sampling": 0.0, "time/decoding": 0.0, "time/reward_wait": 0.0}
    traj, rewards = trainer.collect(0, timings)
    advantages = trainer.advantages(traj, rewards)
    est = PRESETS[preset]
    # Move the weights away from the sampling policy so ratios differ from 1 and clipping is active.
    reference_unet = copy.deepcopy(trainer.unet)
    with torch.no_grad():
        for p in trainer.unet.parameters():
            p.add_(2e-3 * torch.randn_like(p))
    n, steps = traj.log_probs.shape
    pairs = torch.stack(torch.meshgrid(torch.arange(n), torch.arange(steps), indexing="ij"), -1).reshape(-1, 2)

    trainer.unet.zero_grad()
    out = trainer.minibatch_loss(Batch(traj, rewards, advantages), pairs)
    out.loss.backward()
    ours = {k: p.grad.clone() for k, p in trainer.unet.named_parameters()}

    trainer.unet.zero_grad()
    hand_adv = _hand_advantages(preset, rewards, traj.group_ids).float()
    torch.testing.assert_close(advantages, hand_adv, atol=1e-5, rtol=1e-5)
    uncond = trainer.uncond
    terms, ratios = [], []
    for i, j in pairs.tolist():
        x_t, x_prev, t = traj.latents[i : i + 1, j], traj.latents[i : i + 1, j + 1], traj.timesteps[j]
        cond = traj.prompt_embeds[i : i + 1]
        mean, sigma, logp = _hand_step(trainer.unet, trainer.pipeline.scheduler, x_t, x_prev, t, cond, uncond,
                                       5.0, 1.0, steps)
        a = hand_adv[i]
        if est.loss == "score_function":
            term = -a * logp
        else:
            ratio = torch.exp(logp - traj.log_probs[i, j])
            ratios.append(ratio.item())
            term = -torch.minimum(ratio * a, ratio.clamp(1 - est.clip_range, 1 + est.clip_range) * a)
        if est.kl_coef:
            with torch.no_grad():
                ref_mean, _, _ = _hand_step(reference_unet, trainer.pipeline.scheduler, x_t, x_prev, t, cond,
                                            uncond, 5.0, 1.0, steps)
            term = term + est.kl_coef * ((mean - ref_mean) ** 2 / (2 * sigma**2)).mean()
        terms.append(term)
    torch.stack(terms).mean().backward()
    if ratios:  # the clip must have been active for some pairs and not for others... or the test is weak
        assert any(abs(r - 1) > est.clip_range for r in ratios)
    for name, p in trainer.unet.named_parameters():
        # float32 round-off of batched vs per-pair UNet calls: compare relative to the tensor's scale
        scale = p.grad.abs().max().item()
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-3, atol=2e-3 * scale + 1e-9)
    assert sum(g.abs().sum() for g in ours.values()) > 0


def test_loop_loss_reads_like_eq_13_14() -> None:
    gen = torch.Generator().manual_seed(0)
    log_probs = torch.randn(6, 3, generator=gen, requires_grad=True)
    old = log_probs.detach() + 1e-4 * torch.randn(6, 3, generator=gen)
    rewards = torch.rand(6, generator=gen)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    loss = loop_loss(log_probs, old, rewards, groups, clip_range=5e-5)
    expected = 0.0
    for i in range(6):
        g = [j for j in range(6) if groups[j] == groups[i]]
        a = rewards[i] - sum(rewards[j] for j in g if j != i) / 2
        for t in range(3):
            rho = torch.exp(log_probs[i, t] - old[i, t])
            expected = expected - torch.minimum(rho * a, rho.clamp(1 - 5e-5, 1 + 5e-5) * a) / 18
    torch.testing.assert_close(loss, expected)


def test_loop_runs_eq_14_and_eq_13_and_every_kind_has_its_function() -> None:
    assert PRESETS["loop"].advantage_fn is leave_one_out and PRESETS["loop"].loss_fn is ppo_clip_loss
    assert set(BATCH_ADVANTAGES) | set(TRACKED_ADVANTAGES) == set(ADVANTAGE_KINDS)
    assert set(LOSSES) == set(LOSS_KINDS)


def test_each_loss_takes_only_the_inputs_it_uses() -> None:
    """REINFORCE's surrogate has no importance ratio, so it takes neither pi_old nor a clip range."""
    assert loss_inputs(score_function_loss) == ("log_probs", "advantages")
    assert loss_inputs(ppo_clip_loss) == LOSS_INPUTS
    assert all(set(loss_inputs(fn)) <= set(LOSS_INPUTS) for fn in LOSSES.values())


def test_trainer_loop_minibatch_loss_is_loop_loss(tmp_path) -> None:
    """The loss the trainer backpropagates for LOOP is ``loop_loss`` of the same log-probs and rewards."""
    trainer = make_trainer(tmp_path, "loop")
    traj, rewards = trainer.collect(0, {"time/sampling": 0.0, "time/decoding": 0.0, "time/reward_wait": 0.0})
    with torch.no_grad():
        for p in trainer.unet.parameters():
            p.add_(2e-3 * torch.randn_like(p))  # off the sampling policy: ratios differ from 1
    n, steps = traj.log_probs.shape
    pairs = torch.stack(torch.meshgrid(torch.arange(n), torch.arange(steps), indexing="ij"), -1).reshape(-1, 2)
    out = trainer.minibatch_loss(Batch(traj, rewards, trainer.advantages(traj, rewards)), pairs)
    i, j = pairs[:, 0], pairs[:, 1]
    step = trainer.train_policy.step(traj.latents[i, j], traj.timesteps[j], traj.prompt_embeds[i], trainer.uncond,
                                next_latents=traj.latents[i, j + 1])
    expected = loop_loss(step.log_prob.reshape(n, steps), traj.log_probs, rewards, traj.group_ids,
                         clip_range=trainer.estimator.clip_range)
    assert out.clip_fraction > 0
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-9)
