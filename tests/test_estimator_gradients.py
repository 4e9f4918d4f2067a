"""Each preset's loss has the gradient of its objective written out independently.

The objectives are those of docs/method.md, "Gradient estimators".
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from loopdiff.advantages import ADVANTAGE_KINDS, BATCH_ADVANTAGES, TRACKED_ADVANTAGES, leave_one_out
from loopdiff.estimators import PRESETS
from loopdiff.objectives import LOSS_INPUTS, LOSS_KINDS, LOSSES, loss_inputs, ppo_clip_loss, score_function_loss
from loopdiff.training.loop import Batch
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
    traj, rewards = trainer.loop.collect(0)[:2]
    advantages = trainer.loop.advantages(rewards, traj.group_ids, traj.prompt_ids)
    est = PRESETS[preset]
    # Move the weights away from the sampling policy so ratios differ from 1 and clipping is active.
    reference_unet = copy.deepcopy(trainer.unet)
    with torch.no_grad():
        for p in trainer.unet.parameters():
            p.add_(2e-3 * torch.randn_like(p))
    n, steps = traj.log_probs.shape
    pairs = torch.stack(torch.meshgrid(torch.arange(n), torch.arange(steps), indexing="ij"), -1).reshape(-1, 2)

    trainer.unet.zero_grad()
    out = trainer.loop.minibatch_loss(Batch(traj, rewards, advantages), pairs)
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


def eq_13_14(log_probs: torch.Tensor, old: torch.Tensor, rewards: torch.Tensor, groups: torch.Tensor,
             clip_range: float) -> torch.Tensor:
    """The LOOP objective written out term by term in float64: A^i = r^i - 1/(K-1) sum_{j != i} r^j (Eq. 14),
    L = -1/N sum_i 1/T sum_t min(rho A^i, clip(rho, 1 - eps, 1 + eps) A^i) (Eq. 13)."""
    n, steps = log_probs.shape
    total = torch.zeros((), dtype=torch.float64)
    for i in range(n):
        same = [j for j in range(n) if groups[j] == groups[i]]
        a = rewards[i].double() - sum(rewards[j].double() for j in same if j != i) / (len(same) - 1)
        for t in range(steps):
            rho = torch.exp(log_probs[i, t].double() - old[i, t].double())
            total = total - torch.minimum(rho * a, rho.clamp(1 - clip_range, 1 + clip_range) * a)
    return total / (n * steps)


def test_loop_runs_eq_14_and_eq_13_and_every_kind_has_its_function() -> None:
    advantage_fn = PRESETS["loop"].advantage_function()
    assert advantage_fn.fn is leave_one_out and PRESETS["loop"].loss_fn is ppo_clip_loss
    assert set(BATCH_ADVANTAGES) | set(TRACKED_ADVANTAGES) == set(ADVANTAGE_KINDS)
    assert set(LOSSES) == set(LOSS_KINDS)
    rewards, groups = torch.tensor([1.0, 2.0, 6.0, 0.0, 4.0]), torch.tensor([0, 0, 0, 1, 1])
    torch.testing.assert_close(advantage_fn(rewards, groups, ["a"] * 5), torch.tensor([-3.0, -1.5, 4.5, -4.0, 4.0]))


def test_each_loss_takes_only_the_inputs_it_uses() -> None:
    """REINFORCE's surrogate has no importance ratio, so it takes neither pi_old nor a clip range."""
    assert loss_inputs(score_function_loss) == ("log_probs", "advantages")
    assert loss_inputs(ppo_clip_loss) == LOSS_INPUTS
    assert all(set(loss_inputs(fn)) <= set(LOSS_INPUTS) for fn in LOSSES.values())


def test_the_trainers_loop_loss_is_eq_13_14_written_out(tmp_path) -> None:
    """The loss the training loop backpropagates for LOOP equals Eq. 13-14 computed by hand from the same
    log-probabilities and rewards."""
    trainer = make_trainer(tmp_path, "loop")
    traj, rewards = trainer.loop.collect(0)[:2]
    with torch.no_grad():
        for p in trainer.unet.parameters():
            p.add_(2e-3 * torch.randn_like(p))  # off the sampling policy: ratios differ from 1
    n, steps = traj.log_probs.shape
    pairs = torch.stack(torch.meshgrid(torch.arange(n), torch.arange(steps), indexing="ij"), -1).reshape(-1, 2)
    advantages = trainer.loop.advantages(rewards, traj.group_ids, traj.prompt_ids)
    out = trainer.loop.minibatch_loss(Batch(traj, rewards, advantages), pairs)
    i, j = pairs[:, 0], pairs[:, 1]
    step = trainer.train_policy.step(traj.latents[i, j], traj.timesteps[j], traj.prompt_embeds[i], trainer.uncond,
                                     next_latents=traj.latents[i, j + 1])
    expected = eq_13_14(step.log_prob.reshape(n, steps), traj.log_probs, rewards, traj.group_ids,
                        trainer.estimator.clip_range)
    assert out.clip_fraction > 0
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-9)
