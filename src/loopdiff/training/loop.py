"""One epoch of policy-gradient fine-tuning, as docs/method.md writes it (the LOOP paper's Eq. 13-14 for LOOP).

    collect    K trajectories x^1..x^K per prompt c from pi_old, with log pi_old(x_{t-1} | x_t, c) per step,
               decoded and scored: r^i = R(x^i_0, c)
    advantages A^i from the rewards of all processes (LOOP: A^i = r^i - 1/(K-1) sum_{j != i} r^j, Eq. 14)
    optimise   shuffled minibatches of (sample, step) pairs; each step minimises the estimator's loss
               (LOOP: -1/K sum_i 1/T sum_t min(rho A^i, clip(rho, 1 - eps, 1 + eps) A^i), Eq. 13,
               rho = pi_theta / pi_old, recomputed with gradients)

The estimator names the functions (``estimator.advantage_function()``, ``estimator.loss_fn``); this module
calls them. How the processes take part (gathers, backward passes, finite checks, the step) is
:class:`loopdiff.training.distributed.Backend`'s.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from loopdiff.advantages import AdvantageFunction, clip_advantages
from loopdiff.config import RunConfig
from loopdiff.estimators import Estimator
from loopdiff.generation import generate
from loopdiff.minibatches import shuffled_pairs, split_minibatches, steps_per_sample
from loopdiff.objectives import LossOutput, gaussian_step_kl, policy_loss
from loopdiff.prompts import PromptSet
from loopdiff.rewards.async_reward import AsyncReward
from loopdiff.rewards.base import RewardFn
from loopdiff.sampling.trajectories import Trajectories
from loopdiff.training.distributed import LOSS_STATS, Backend
from loopdiff.training.guards import check_skipped_steps, finite_sample_mask
from loopdiff.training.metrics import peak_memory_mb, tensor_stats
from loopdiff.transfer import to_device

SHOWN_SAMPLES = 4  # training samples logged as images (output.log_images_every)


@dataclass
class Batch:
    """One epoch's samples with their rewards and advantages."""

    trajectories: Trajectories
    rewards: torch.Tensor
    advantages: torch.Tensor


@dataclass
class Models:
    """What an epoch samples and trains with: the pipeline (its VAE decodes), the sampling and the training
    policies over one denoiser, the prompt encoder, and the optional reference policy (KL penalty), text encoder
    (LoRA-trained) and EMA of the weights."""

    pipeline: Any
    unet: torch.nn.Module
    rollout_policy: Any
    train_policy: Any
    encoder: Any
    reference: Any = None
    text_encoder: torch.nn.Module | None = None
    ema: Any = None

    def __post_init__(self) -> None:
        self.uncond = self.encoder.unconditional()

    def refresh_embeddings(self) -> None:
        """With a training text encoder, drop the cached prompt embeddings (its weights moved)."""
        if self.text_encoder is not None:
            self.encoder.clear()
            self.uncond = self.encoder.unconditional()


def derived_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (epoch, process, ...)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> 1)


class EpochLoop:
    """collect -> rewards -> advantages -> optimise, for one estimator on one set of training prompts."""

    def __init__(self, config: RunConfig, estimator: Estimator, models: Models, backend: Backend,
                 prompts: PromptSet, reward_fn: RewardFn, reward_name: str, monitors: dict[str, RewardFn]):
        self.config, self.estimator, self.models, self.backend = config, estimator, models, backend
        self.prompts, self.reward_fn, self.reward_name, self.monitors = prompts, reward_fn, reward_name, monitors
        self.advantage_fn: AdvantageFunction = estimator.advantage_function()  # LOOP: leave_one_out (Eq. 14)
        self.monitored: dict[str, torch.Tensor] = {}  # the last collect's monitor scores, by reward name
        self.shown_samples: tuple[torch.Tensor, list[str]] | None = None  # the last epoch's first samples

    def run(self, epoch: int) -> dict[str, float]:
        """One epoch: collect, score, advantages, optimise; returns its metrics."""
        start = time.perf_counter()
        trajectories, rewards, timings = self.collect(epoch)
        t0 = time.perf_counter()
        names = list(self.monitored)
        all_rewards, groups, prompt_ids, *scores = self.backend.gather_columns(
            rewards, trajectories.group_ids, trajectories.prompt_ids, *self.monitored.values())
        keep, counts = self.finite_samples(all_rewards, groups, epoch)
        every = torch.full_like(all_rewards, torch.nan)
        every[keep] = self.advantages(all_rewards[keep], groups[keep], prompt_ids[keep])
        mine = self.backend.local(keep)
        advantages = self.backend.local(every)[mine]
        if not bool(mine.all()):
            trajectories, rewards = trajectories.select(mine), rewards[mine]
        t1 = time.perf_counter()
        stats = self.optimise(Batch(trajectories, rewards, advantages), epoch)
        t2 = time.perf_counter()
        return {**tensor_stats("reward", all_rewards[torch.isfinite(all_rewards)]),
                **tensor_stats("advantage", advantages),
                **{k: v for name, s in zip(names, scores) for k, v in tensor_stats(f"monitor/{name}", s).items()},
                **counts, **stats, **timings, "time/advantages": t1 - t0, "time/training": t2 - t1,
                "time/epoch": t2 - start, "memory/peak_mb": peak_memory_mb(self.backend.device)}

    def collect(self, epoch: int) -> tuple[Trajectories, torch.Tensor, dict[str, float]]:
        """Sample K trajectories for each of this process's prompts and score them; the training reward runs in
        a worker thread, overlapping the next sampling chunk. Returns the trajectories, rewards and timings."""
        acc, k, m = self.backend.accelerator, self.estimator.samples_per_prompt, self.models
        n_prompts = self.config.training.samples_per_epoch // acc.num_processes // k
        seed = self.config.training.seed
        rng = np.random.default_rng(derived_seed(seed, epoch, acc.process_index))
        generator = torch.Generator().manual_seed(derived_seed(seed, epoch, acc.process_index, 1))
        prompt_ids = torch.tensor(self.prompts.sample(n_prompts, rng)).repeat_interleave(k)
        group_ids = (torch.arange(n_prompts) + acc.process_index * n_prompts).repeat_interleave(k)
        m.refresh_embeddings()
        prompts = [self.prompts.prompts[i] for i in prompt_ids.tolist()]
        metadata = [self.prompts.metadata[i] for i in prompt_ids.tolist()]
        embeds = m.encoder(prompts)
        timings = {"time/sampling": 0.0, "time/decoding": 0.0, "time/reward_wait": 0.0}
        chunk, latents, log_probs, futures = self.config.sampling.batch_size, [], [], []
        monitored: dict[str, list[torch.Tensor]] = {name: [] for name in self.monitors}
        m.unet.eval()  # sampling is the policy itself (matters for UNets with dropout)
        with AsyncReward(self.reward_fn, name=self.reward_name) as scorer:
            for start in range(0, len(prompts), chunk):
                part = slice(start, start + chunk)
                made = generate(m.rollout_policy, m.pipeline.vae, embeds[part], m.uncond, generator, prompts[part],
                                metadata[part], self.monitors, batch_size=chunk, autocast=acc.autocast,
                                timings=timings)
                latents.append(made.latents)  # the images are kept only until the reward has them
                log_probs.append(made.log_probs)
                for name, scores in made.scores.items():
                    monitored[name].append(scores)
                if start == 0:
                    self.shown_samples = (made.images[:SHOWN_SAMPLES].cpu(), prompts[:SHOWN_SAMPLES])
                futures.append(scorer.submit(made.images, prompts[part], metadata[part]))
                if not self.config.reward.asynchronous:
                    futures[-1].result()  # score before sampling the next chunk
            t0 = time.perf_counter()
            rewards = torch.cat([f.result() for f in futures])
            timings["time/reward_wait"] += time.perf_counter() - t0
        self.monitored = {name: torch.cat(scores) for name, scores in monitored.items()}
        trajectories = Trajectories(
            latents=torch.cat(latents), log_probs=torch.cat(log_probs),
            timesteps=m.rollout_policy.timesteps.to(self.backend.device), prompt_ids=prompt_ids,
            group_ids=group_ids, prompt_embeds=embeds, prompts=list(self.prompts.prompts),
            metadata=list(self.prompts.metadata))
        return trajectories, rewards, timings

    def advantages(self, rewards: torch.Tensor, group_ids: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
        """The advantages of all processes' (finite) samples, clipped to ``estimator.advantage_clip``."""
        prompts = [self.prompts.prompts[i] for i in prompt_ids.tolist()]
        values = self.advantage_fn(rewards.float(), group_ids, prompts)  # LOOP: leave_one_out (Eq. 14)
        return clip_advantages(values, self.estimator.advantage_clip)

    def finite_samples(self, rewards: torch.Tensor, group_ids: torch.Tensor,
                       epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Mask over all processes' samples of the groups with only finite rewards, and the counts as metrics
        (:func:`~loopdiff.training.guards.finite_sample_mask`); the main process prints its warning."""
        t = self.config.training
        pairs = steps_per_sample(self.config.sampling.num_steps, t.timestep_fraction, t.train_denoising_steps)
        keep, counts, warning = finite_sample_mask(
            rewards, group_ids, self.reward_name, epoch + 1, t.max_nonfinite_fraction,
            self.backend.accelerator.num_processes, pairs, self.estimator.minibatches)
        if warning is not None and self.backend.accelerator.is_main_process:
            print(warning, file=sys.stderr)
        return keep, counts

    def optimise(self, batch: Batch, epoch: int) -> dict[str, float]:
        """Inner epochs of shuffled minibatches over (sample, step) pairs, one optimiser step per minibatch;
        returns the loss statistics averaged over the pairs of the steps taken."""
        traj, est, t, backend = batch.trajectories, self.estimator, self.config.training, self.backend
        sums = {key: torch.zeros((), dtype=torch.float64, device=backend.device) for key in LOSS_STATS}
        grad_norms, pairs_seen, steps = [], 0, 0
        backend.train_unet.train()
        for inner in range(est.inner_epochs):
            generator = torch.Generator().manual_seed(derived_seed(t.seed, epoch, backend.accelerator.process_index,
                                                                   2, inner))
            pairs = shuffled_pairs(len(traj), traj.log_probs.shape[1], t.timestep_fraction, generator,
                                   t.train_denoising_steps)
            for minibatch in split_minibatches(pairs, est.minibatches, t.micro_batch_size):
                step_sums = backend.accumulate(minibatch, lambda micro: self.minibatch_loss(batch, micro))
                steps += 1
                stepped, grad_norm = backend.step_if_finite(step_sums["loss"])
                if stepped:
                    if self.models.ema is not None:
                        self.models.ema.step()
                    sums = {key: sums[key] + step_sums[key] for key in sums}
                    pairs_seen += sum(len(m) for m in minibatch)
                    grad_norms.append(grad_norm)
        check_skipped_steps(steps - len(grad_norms), steps, t.max_skipped_fraction, epoch + 1)
        stats = {key: float(value) / max(1, pairs_seen) for key, value in sums.items()}
        stats["grad_norm"] = float(np.mean([float(g) for g in grad_norms])) if grad_norms else 0.0
        stats["optimizer_steps"] = float(steps)
        stats["skipped_steps"] = float(steps - len(grad_norms))
        return stats

    def minibatch_loss(self, batch: Batch, micro: torch.Tensor) -> LossOutput:
        """The estimator's loss on the (sample index, step index) pairs ``micro`` (one denoiser call)."""
        traj, est, m, device = batch.trajectories, self.estimator, self.models, self.backend.device
        i, j = to_device(micro[:, 0], device), to_device(micro[:, 1], device)
        latents, next_latents = traj.latents[i, j], traj.latents[i, j + 1]
        timesteps, embeds, uncond = traj.timesteps[j], traj.prompt_embeds[i], m.uncond
        if m.text_encoder is not None:  # the embeddings again, with gradients into the text encoder's adapters
            embeds = m.encoder.encode_with_grad([traj.prompts[k] for k in traj.prompt_ids[i.cpu()].tolist()])
            uncond = m.encoder.encode_with_grad([m.encoder.negative_prompt])
        with self.backend.accelerator.autocast():
            out = m.train_policy.step(latents, timesteps, embeds, uncond, next_latents=next_latents)
            step_kl = None if m.reference is None else self._reference_kl(out, latents, next_latents, timesteps, embeds)
        return policy_loss(
            est.loss_fn,  # LOOP: ppo_clip_loss (Eq. 13)
            out.log_prob,
            traj.log_probs[i, j],
            to_device(batch.advantages, device)[i],
            clip_range=est.clip_range,
            step_kl=step_kl,
            kl_coef=est.kl_coef,
        )

    def _reference_kl(self, out: Any, latents: torch.Tensor, next_latents: torch.Tensor, timesteps: torch.Tensor,
                      embeds: torch.Tensor) -> torch.Tensor:
        """KL(pi_theta || pi_ref) of each pair's step, the reference being the base model (estimator.kl_coef)."""
        m = self.models
        with torch.no_grad(), m.reference.active() as ref_unet:
            ref_policy = type(m.train_policy)(ref_unet, m.pipeline.scheduler, m.train_policy.config)
            ref = ref_policy.step(latents, timesteps, embeds, m.uncond, next_latents=next_latents)
        return gaussian_step_kl(out.mean, ref.mean, out.std, self.config.sampling.logprob_reduction)
