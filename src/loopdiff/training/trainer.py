"""The training loop shared by every estimator.

Per epoch: sample prompts x K trajectories without gradients -> decode -> rewards (in a worker thread,
overlapping the next sampling chunk) -> advantages -> inner epochs of shuffled minibatches over
(sample, step) pairs, recomputing log pi with gradients -> clipped AdamW steps (each followed by the EMA
update with ``training.ema_decay``). Evaluation before and after; evaluations and the export use the EMA
weights when there is an EMA.

The sampling and the training policy share one denoiser. Under DDP the training policy calls it through the
DDP wrapper and sampling calls the module itself; under FSDP2 ``accelerator.prepare`` shards the module in
place, and both call the sharded module (what changes then is in :mod:`loopdiff.sharding`). Under DeepSpeed ZeRO-2
the training policy calls the DeepSpeed engine, which also takes the optimiser step (:mod:`loopdiff.training.zero`).
"""

from __future__ import annotations

import contextlib
import json
import math
import pickle
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from loopdiff.advantages import clip_advantages, finite_groups
from loopdiff.config import (
    ConfigError,
    RunConfig,
    build_estimator,
    check_processes,
    complete,
    fixed_changes,
    parse_trade_off,
)
from loopdiff.evaluation import EvalResult, evaluate
from loopdiff.objectives import LossOutput, gaussian_step_kl, policy_loss
from loopdiff.prompts import PromptSet, load_prompt_set
from loopdiff.grids import save_grid, side_by_side
from loopdiff.rewards.async_reward import AsyncReward
from loopdiff.rewards.base import RewardFn, build_reward, score_batch
from loopdiff.sampling.trajectories import Trajectories, decode_latents, sample_trajectories
from loopdiff.training import checkpoint as ckpt
from loopdiff.training.best import (
    BEST_DIR,
    BEST_WEIGHTS,
    BestKeeper,
    kept_info,
    load_kept_weights,
    plot_trade_off,
    save_kept_weights,
)
from loopdiff.training.text_encoder_lora import (
    add_text_encoder_lora,
    check_text_encoder_training,
    text_encoder_lora_layers,
)
from loopdiff.training.ema import ParameterEMA
from loopdiff.training.hub import hub_repo_id, push_export
from loopdiff.training.lr_schedule import epoch_lr_scheduler
from loopdiff.training.guards import (
    check_engine_step,
    check_finite_weights,
    check_nonfinite_rewards,
    check_skipped_steps,
    nonfinite_names,
    refuse_nonfinite_weights,
)
from loopdiff.training.launches import precision_in_use, record_launch
from loopdiff.training.metrics import MetricsLogger, peak_memory_mb, reset_peak_memory, tensor_stats
from loopdiff.training.model_card import model_card
from loopdiff.minibatches import shuffled_pairs, split_minibatches, steps_per_sample
from loopdiff.training.preflight import (
    check_deepspeed_config,
    check_device,
    check_fsdp_version,
    check_launch,
    check_logging,
    check_output_dir,
    check_reward_names,
    check_reward_options,
    check_reward_prompts,
    check_sharding,
)
from loopdiff.sharding import full_model_state_dict, is_sharded, local, reshard, unsharded_copy
from loopdiff.training.zero import quiet_cpu_accelerator_notice, zero_optimizer
from loopdiff.transfer import to_device
from loopdiff.models import (
    ReferencePolicy,
    build_policies,
    check_passed_pipeline,
    compile_denoiser,
    configure_attention,
    configure_tf32,
    configure_trainable,
    denoiser,
    is_flow_matching,
    is_sdxl,
    load_pipeline,
    load_trainable_state_dict,
    pipeline_class_name,
    text_encoders,
    trainable_state_dict,
)


LOSS_STATS = ("loss", "approx_kl", "clip_fraction", "kl_penalty")
SHOWN_SAMPLES = 4  # training samples logged as images (output.log_images_every)


@dataclass
class Batch:
    """One epoch's samples with their rewards and advantages."""

    trajectories: Trajectories
    rewards: torch.Tensor
    advantages: torch.Tensor


def _seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (epoch, process, ...)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> 1)


def training_reward_name(config: RunConfig, reward_fn: RewardFn | None) -> str:
    """The training reward's name in logs and evaluations: a passed ``reward_fn``'s own (the function's, or
    its class's), else ``reward.name``, which a model other than the embedded one must set."""
    if reward_fn is not None:
        return getattr(reward_fn, "__name__", type(reward_fn).__name__)
    if config.reward.name is None:
        raise ConfigError(
            f"reward.name is required for a model other than 'embedded' (model.pretrained="
            f"{config.model.pretrained!r}); allowed: a registered reward (loopdiff rewards) or package.module:function"
        )
    return config.reward.name


class Trainer:
    """Fine-tunes a pipeline's denoiser (the UNet of Stable Diffusion 1/2 or SDXL, or the SD3 or Flux
    transformer) with the configured estimator."""

    def __init__(self, config: RunConfig, reward_fn: RewardFn | None = None, pipeline: Any = None):
        """``reward_fn`` (a reward callable) replaces ``reward.name``; ``pipeline`` replaces ``model.pretrained``."""
        if pipeline is not None:
            check_passed_pipeline(config.model, pipeline)
        self.config = complete(config)
        self.estimator = build_estimator(config)
        self.reward_name = training_reward_name(config, reward_fn)
        quiet_cpu_accelerator_notice()  # before accelerate imports DeepSpeed
        self.accelerator = Accelerator(
            mixed_precision=config.model.mixed_precision,
            cpu=config.model.device == "cpu",
        )
        self.device = self.accelerator.device
        self.run_dir = Path(config.output.dir)
        self._check_before_loading()
        self.train_prompts = load_prompt_set(config.prompts.train).head(config.prompts.max_train)
        check_reward_prompts(config, self._scored_prompt_sets(), training_reward=reward_fn is None)
        self.reward_fn = reward_fn or build_reward(self.reward_name, config.reward.options)
        self.monitor_rewards = {name: build_reward(name, config.reward.options) for name in config.reward.monitor}
        self.monitored: dict[str, torch.Tensor] = {}  # the last collect's monitor scores, by reward name
        self._evaluation_rewards: dict[str, RewardFn] | None = None
        self._setup_model(pipeline)
        self.tracker = self.estimator.new_tracker()  # the per-prompt reward history of a tracked advantage
        self.epoch = 0
        self.history: list[dict[str, float]] = []
        o = config.output
        self.best = BestKeeper(parse_trade_off(o.keep_best), o.keep_best_window) if o.keep_best else None
        if self.best is not None and self.sharded:
            raise ConfigError(f"output.keep_best={o.keep_best!r} needs unsharded weights; it is not available "
                              "under FSDP (use DDP or DeepSpeed ZeRO-2, or unset output.keep_best)")
        self.resumed = False
        self.logger: MetricsLogger | None = None  # while train() runs
        self.shown_samples: tuple[torch.Tensor, list[str]] | None = None  # the last epoch's first samples

    # ------------------------------------------------------------------ setup

    def _check_before_loading(self) -> None:
        """Fail fast, before the model loads: launch, process count, output folder, resume point."""
        check_launch(self.accelerator.num_processes)
        check_device(self.config.model.device, self.accelerator.device)
        check_reward_options(self.config)
        check_reward_names(self.config)
        check_sharding(self.accelerator.distributed_type.value)
        if self.accelerator.distributed_type.value == "FSDP":
            check_fsdp_version(self.accelerator.state.fsdp_plugin.fsdp_version)
        if self.accelerator.distributed_type.value == "DEEPSPEED":
            check_deepspeed_config(self.accelerator.state.deepspeed_plugin.deepspeed_config, self.config)
        check_processes(self.config, self.accelerator.num_processes)
        check_logging(self.config)
        check_output_dir(self.run_dir)
        self._resume_path = self.resume_point() if self.config.output.resume else None

    def _scored_prompt_sets(self) -> dict[str, PromptSet]:
        """The prompt sets the rewards score (validation only when it is evaluated)."""
        sets = {"train": self.train_prompts}
        if self._wants_eval():
            sets["val"] = load_prompt_set(self.config.prompts.val).head(self.config.eval.max_prompts)
        return sets

    def _setup_model(self, pipeline: Any) -> None:
        config = self.config
        self.pipeline = pipeline if pipeline is not None else load_pipeline(config.model)
        pipe = self.pipeline
        pipe.vae.to(self.device)
        for encoder in text_encoders(pipe):
            encoder.to(self.device)
        self.unet = denoiser(pipe).to(self.device)  # the UNet, or an SD3 or Flux pipeline's transformer
        configure_attention(self.unet, config.model.attention, self.device)
        configure_tf32(config.model.tf32, self.device)
        params = configure_trainable(self.unet, config.model)
        self.text_encoder = pipe.text_encoder if config.model.train_text_encoder else None  # trained with LoRA
        if self.text_encoder is not None:
            check_text_encoder_training(config, pipe, self.accelerator.num_processes, self.estimator.kl_coef)
            params += add_text_encoder_lora(self.text_encoder, config.model)
        if config.training.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()  # only in train mode with gradients: sampling is unchanged
        if config.model.compile:
            compile_denoiser(self.unet)
        self.reference = ReferencePolicy(self.unet, config.model.lora) if self.estimator.kl_coef > 0 else None
        train_cfg = config.training
        fused = {"fused": True} if self.device.type in ("cpu", "cuda") else {}
        optimizer = torch.optim.AdamW(
            params,
            lr=train_cfg.learning_rate,
            betas=(train_cfg.adam_beta1, train_cfg.adam_beta2),
            eps=train_cfg.adam_eps,
            weight_decay=train_cfg.weight_decay,
            **fused,
        )
        self.lr_scheduler = epoch_lr_scheduler(
            optimizer, train_cfg.lr_scheduler, train_cfg.warmup_epochs, train_cfg.epochs
        )
        self.train_unet, self.optimizer = self.accelerator.prepare(self.unet, optimizer)
        # FSDP2 shards the module in place (its parameters become DTensor shards): from here on it is the
        # sharded module, which sampling must call too so that its forward passes gather the weights.
        self.sharded = is_sharded(self.accelerator.unwrap_model(self.train_unet))
        if self.sharded:
            self.unet = self.accelerator.unwrap_model(self.train_unet)
        # Under DeepSpeed the prepared module is a ZeRO-2 engine and the optimiser a ZeRO optimiser: the engine
        # takes the optimiser steps (see accumulate_gradients and step_if_finite).
        self.deepspeed = zero_optimizer(self.optimizer) is not None
        # What the optimiser steps: the prepared module's parameters (FSDP2 replaced the ones above; under DDP
        # and DeepSpeed they are the same objects).
        self.params = [p for p in self.train_unet.parameters() if p.requires_grad]
        if self.text_encoder is not None:
            self.params += [p for p in self.text_encoder.parameters() if p.requires_grad]
        decay = train_cfg.ema_decay
        self.ema = ParameterEMA(self.unet, decay, train_cfg.ema_every) if decay else None
        # The same weights twice: sampled from without gradients, and trained through the accelerate wrapper.
        # DiffusionPolicy + PromptEncoder (SDXLPromptEncoder for SDXL), FlowMatchPolicy + SD3PromptEncoder
        # for an SD3 pipeline, FluxPolicy + FluxPromptEncoder for a Flux one.
        self.rollout_policy, self.train_policy, self.encoder = build_policies(
            pipe, self.unet, self.train_unet, config.sampling, self.device
        )
        self.uncond = self.encoder.unconditional()

    # ------------------------------------------------------------------ phases

    def collect(self, epoch: int, timings: dict[str, float]) -> tuple[Trajectories, torch.Tensor]:
        """Sample this epoch's trajectories and score them (rewards overlap the next sampling chunk)."""
        acc, est = self.accelerator, self.estimator
        per_process = self.config.training.samples_per_epoch // acc.num_processes
        n_prompts = per_process // est.samples_per_prompt
        rng = np.random.default_rng(_seed(self.config.training.seed, epoch, acc.process_index))
        generator = torch.Generator().manual_seed(_seed(self.config.training.seed, epoch, acc.process_index, 1))
        chosen = torch.tensor(self.train_prompts.sample(n_prompts, rng))
        self._refresh_embeddings()
        prompt_ids = chosen.repeat_interleave(est.samples_per_prompt)
        group_ids = (torch.arange(n_prompts) + acc.process_index * n_prompts).repeat_interleave(est.samples_per_prompt)
        prompts = [self.train_prompts.prompts[i] for i in prompt_ids.tolist()]
        metadata = [self.train_prompts.metadata[i] for i in prompt_ids.tolist()]
        embeds = self.encoder(prompts)

        chunk = self.config.sampling.batch_size
        latents, log_probs, futures = [], [], []
        monitored: dict[str, list[torch.Tensor]] = {name: [] for name in self.monitor_rewards}
        self.unet.eval()  # sampling is the policy itself (matters for UNets with dropout)
        with AsyncReward(self.reward_fn, name=self.reward_name) as scorer:
            for start in range(0, len(prompts), chunk):
                t0 = time.perf_counter()
                with acc.autocast():
                    lat, lp = sample_trajectories(
                        self.rollout_policy, embeds[start : start + chunk], self.uncond, generator, batch_size=chunk
                    )
                t1 = time.perf_counter()
                images = decode_latents(self.pipeline.vae, lat[:, -1])
                t2 = time.perf_counter()
                timings["time/sampling"] += t1 - t0
                timings["time/decoding"] += t2 - t1
                latents.append(lat)
                log_probs.append(lp)
                if start == 0:
                    self.shown_samples = (images[:SHOWN_SAMPLES].cpu(), prompts[:SHOWN_SAMPLES])
                self._monitor(monitored, images, prompts[start : start + chunk], metadata[start : start + chunk])
                futures.append(scorer.submit(images, prompts[start : start + chunk], metadata[start : start + chunk]))
                if not self.config.reward.asynchronous:
                    futures[-1].result()  # score before sampling the next chunk
            t3 = time.perf_counter()
            rewards = torch.cat([f.result() for f in futures])
            timings["time/reward_wait"] += time.perf_counter() - t3
        self.monitored = {name: torch.cat(scores) for name, scores in monitored.items()}
        trajectories = Trajectories(
            latents=torch.cat(latents),
            log_probs=torch.cat(log_probs),
            timesteps=self.rollout_policy.timesteps.to(self.device),
            prompt_ids=prompt_ids,
            group_ids=group_ids,
            prompt_embeds=embeds,
            prompts=list(self.train_prompts.prompts),
            metadata=list(self.train_prompts.metadata),
        )
        return trajectories, rewards

    def _refresh_embeddings(self) -> None:
        """With a training text encoder, drop the cached prompt embeddings (its weights moved)."""
        if self.text_encoder is not None:
            self.encoder.clear()
            self.uncond = self.encoder.unconditional()

    def _monitor(self, out: dict[str, list[torch.Tensor]], images: torch.Tensor, prompts: list[str], metadata: list) -> None:
        """Score ``images`` with each ``reward.monitor`` reward (logged only, never trained on)."""
        for name, reward in self.monitor_rewards.items():
            out[name].append(score_batch(reward, images, prompts, metadata, name))

    def _gather(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` of every process, concatenated in process order, on the CPU."""
        return self.accelerator.gather(values.to(self.device)).cpu()

    def _local(self, values: torch.Tensor) -> torch.Tensor:
        """This process's share of a gathered per-sample tensor."""
        local = len(values) // self.accelerator.num_processes
        return values[self.accelerator.process_index * local :][:local]

    def advantages(
        self, trajectories: Trajectories, rewards: torch.Tensor, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Advantages over the whole batch of all processes; returns this process's share.

        ``keep`` (a mask over all processes' samples, default all) leaves the other samples out of the
        baselines and of the result.
        """
        all_rewards = self._gather(rewards)
        keep = torch.ones(len(all_rewards), dtype=torch.bool) if keep is None else keep
        all_groups = self._gather(trajectories.group_ids)[keep]
        prompts = [self.train_prompts.prompts[i] for i in self._gather(trajectories.prompt_ids)[keep].tolist()]
        advantages = torch.full_like(all_rewards, math.nan, dtype=torch.float32)
        kept = all_rewards[keep].float()
        if self.tracker is not None:
            values = self.tracker.update(prompts, kept)
        else:
            values = self.estimator.advantage_fn(kept, all_groups)  # LOOP: leave_one_out (Eq. 14)
        advantages[keep] = clip_advantages(values, self.estimator.advantage_clip)
        return self._local(advantages)[self._local(keep)]

    def finite_samples(
        self, rewards: torch.Tensor, group_ids: torch.Tensor, epoch: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Mask over all processes' samples of the groups with only finite rewards, and the counts as metrics.

        Warns when it drops a group; raises NonFiniteError when too many rewards are non-finite or too few
        samples remain.
        """
        keep = finite_groups(rewards, group_ids)
        nonfinite, dropped = int((~torch.isfinite(rewards)).sum()), int(group_ids[~keep].unique().numel())
        counts = {"nonfinite_rewards": float(nonfinite), "dropped_groups": float(dropped)}
        if nonfinite == 0:
            return keep, counts
        name, total = self.reward_name, len(rewards)
        check_nonfinite_rewards(name, nonfinite, total, self.config.training.max_nonfinite_fraction, epoch + 1,
                                self._too_few_left(keep))
        if self.accelerator.is_main_process:
            print(f"warning: reward '{name}' was non-finite for {nonfinite} of {total} images in epoch {epoch + 1}; "
                  f"dropped their {dropped} prompt group(s) ({int((~keep).sum())} images)", file=sys.stderr)
        return keep, counts

    def _too_few_left(self, keep: torch.Tensor) -> str | None:
        """Why the kept samples cannot fill the epoch's optimiser steps on some process, or None."""
        if not bool(keep.any()):
            return "no prompt group with only finite rewards remains"
        train_cfg = self.config.training
        pairs = keep.view(self.accelerator.num_processes, -1).sum(1) * steps_per_sample(
            self.config.sampling.num_steps, train_cfg.timestep_fraction, train_cfg.train_denoising_steps
        )
        short = (pairs < self.estimator.minibatches).nonzero().flatten().tolist()
        if not short:
            return None
        return (f"process {short[0]} keeps {int(pairs[short[0]])} (sample, step) pairs, fewer than "
                f"estimator.minibatches={self.estimator.minibatches}")

    def optimise(self, batch: Batch, epoch: int) -> dict[str, float]:
        """Inner epochs of shuffled minibatches over (sample, step) pairs; returns averaged statistics."""
        traj, est, train_cfg = batch.trajectories, self.estimator, self.config.training
        sums = dict.fromkeys(LOSS_STATS, 0.0)
        grad_norms, pairs_seen, steps = [], 0, 0
        self.train_unet.train()
        for inner in range(est.inner_epochs):
            seed = _seed(train_cfg.seed, epoch, self.accelerator.process_index, 2, inner)
            generator = torch.Generator().manual_seed(seed)
            pairs = shuffled_pairs(len(traj), traj.log_probs.shape[1], train_cfg.timestep_fraction, generator,
                                   train_cfg.train_denoising_steps)
            for minibatch in split_minibatches(pairs, est.minibatches, train_cfg.micro_batch_size):
                step_sums = self.accumulate_gradients(batch, minibatch)
                steps += 1
                stepped, grad_norm = self.step_if_finite(step_sums["loss"])
                if stepped:
                    if self.ema is not None:
                        self.ema.step()
                    for key in sums:
                        sums[key] += step_sums[key]
                    pairs_seen += sum(len(m) for m in minibatch)
                    grad_norms.append(grad_norm)
        check_skipped_steps(steps - len(grad_norms), steps, train_cfg.max_skipped_fraction, epoch + 1)
        stats = {key: value / max(1, pairs_seen) for key, value in sums.items()}
        stats["grad_norm"] = float(np.mean(grad_norms)) if grad_norms else 0.0
        stats["optimizer_steps"] = float(steps)
        stats["skipped_steps"] = float(steps - len(grad_norms))
        return stats

    def accumulate_gradients(self, batch: Batch, minibatch: list[torch.Tensor]) -> dict[str, float]:
        """Backward through one optimiser step's micro-batches, gradients synced on the last one.

        Returns the loss statistics summed over the micro-batches, weighted by their numbers of pairs.
        """
        total = sum(len(m) for m in minibatch)
        sums = dict.fromkeys(LOSS_STATS, 0.0)
        passes = self._passes(len(minibatch))
        for k in range(passes):
            # A pass beyond this process's micro-batches (FSDP and DeepSpeed only) repeats one pair with weight 0.
            micro, weight = (minibatch[k], len(minibatch[k]) / total) if k < len(minibatch) else (minibatch[0][:1], 0.0)
            last = k == passes - 1
            sync = contextlib.nullcontext() if last or self.deepspeed else self.accelerator.no_sync(self.train_unet)
            with sync:
                out = self.minibatch_loss(batch, micro)
                if k < len(minibatch):
                    for key in sums:
                        sums[key] += float(getattr(out, key).detach()) * len(micro)
                if self.deepspeed:
                    self._engine_backward(out.loss * weight, last, sums["loss"])
                else:
                    self.accelerator.backward(out.loss * weight)
        return sums

    def _engine_backward(self, loss: torch.Tensor, last: bool, loss_sum: float) -> None:
        """A backward pass under DeepSpeed: through the engine, the last of the step marked as its accumulation
        boundary, and not divided by DeepSpeed's accumulation steps (the micro-batch weights already average).

        On the last pass, when the step's loss (``loss_sum`` so far) is not finite on some process, the pass is
        scaled by NaN: DeepSpeed then finds a non-finite gradient norm and skips the step, as it skips one whose
        gradients are not finite (see :meth:`step_if_finite`)."""
        if last and not self._finite_everywhere(loss_sum):
            loss = loss * math.nan
        self.train_unet.set_gradient_accumulation_boundary(last)
        self.train_unet.backward(loss, scale_wrt_gas=False)

    def _passes(self, micro_batches: int) -> int:
        """How many forward and backward passes this optimiser step takes: its micro-batches, or under FSDP and
        DeepSpeed the most any process has (each FSDP pass gathers the sharded weights from all processes, each
        ZeRO-2 backward pass reduces the gradients, so all take the same number; a process left with fewer
        pairs by dropped non-finite rewards pads with weight-0 passes)."""
        if not (self.sharded or self.deepspeed):
            return micro_batches
        return int(self.accelerator.gather(torch.tensor([micro_batches], device=self.device)).max())

    def _finite_everywhere(self, *values: float) -> bool:
        """Whether ``values`` are finite on every process (every process calls this)."""
        bad = torch.tensor([float(not all(math.isfinite(v) for v in values))], device=self.device)
        return not bool(self.accelerator.gather(bad).any())

    def step_if_finite(self, loss: float) -> tuple[bool, float]:
        """Clip the gradients to ``training.max_grad_norm`` and take the optimiser step, unless the loss or the
        gradient norm is non-finite on any process. Returns whether it stepped, and the norm before clipping.

        A skipped step drops its gradients (and, under fp16, lowers the loss scale). Under DeepSpeed the engine
        clips (to the config's ``gradient_clipping``, which the launch check made ``training.max_grad_norm``),
        steps, and skips a step whose gradient norm is not finite; a non-finite loss was made one by
        :meth:`_engine_backward`.
        """
        if self.deepspeed:
            self.train_unet.step()
            applied, grad_norm = self.train_unet.was_step_applied(), float(self.train_unet.get_global_grad_norm())
            check_engine_step(applied, grad_norm)
            return applied, grad_norm
        grad_norm = float(self.accelerator.clip_grad_norm_(self.params, self.config.training.max_grad_norm))
        finite = self._finite_everywhere(loss, grad_norm)
        if finite:
            self.optimizer.step()
        elif self.accelerator.scaler is not None:
            self.accelerator.scaler.update()  # clip_grad_norm_ unscaled and found the overflow
        self.optimizer.zero_grad(set_to_none=True)
        return finite, grad_norm

    def minibatch_loss(self, batch: Batch, micro: torch.Tensor) -> LossOutput:
        """The estimator's loss on the (sample index, step index) pairs ``micro`` (one UNet call)."""
        traj, est = batch.trajectories, self.estimator
        i, j = to_device(micro[:, 0], self.device), to_device(micro[:, 1], self.device)
        latents, next_latents = traj.latents[i, j], traj.latents[i, j + 1]
        timesteps, embeds, uncond = traj.timesteps[j], traj.prompt_embeds[i], self.uncond
        if self.text_encoder is not None:  # the embeddings again, with gradients into the text encoder's adapters
            embeds = self.encoder.encode_with_grad([traj.prompts[k] for k in traj.prompt_ids[i.cpu()].tolist()])
            uncond = self.encoder.encode_with_grad([self.encoder.negative_prompt])
        with self.accelerator.autocast():
            out = self.train_policy.step(latents, timesteps, embeds, uncond, next_latents=next_latents)
            step_kl = None
            if self.reference is not None:
                step_kl = self._reference_kl(out, latents, next_latents, timesteps, embeds)
        return policy_loss(
            est.loss_fn,  # LOOP: ppo_clip_loss (Eq. 13)
            out.log_prob,
            traj.log_probs[i, j],
            to_device(batch.advantages, self.device)[i],
            clip_range=est.clip_range,
            step_kl=step_kl,
            kl_coef=est.kl_coef,
        )

    def _reference_kl(self, out, latents, next_latents, timesteps, embeds) -> torch.Tensor:
        assert self.reference is not None
        with torch.no_grad(), self.reference.active() as ref_unet:
            ref_policy = type(self.train_policy)(ref_unet, self.pipeline.scheduler, self.train_policy.config)
            ref = ref_policy.step(latents, timesteps, embeds, self.uncond, next_latents=next_latents)
        return gaussian_step_kl(out.mean, ref.mean, out.std, self.config.sampling.logprob_reduction)

    # ------------------------------------------------------------------ epochs, checkpoints, evaluation

    def run_epoch(self, epoch: int) -> dict[str, float]:
        """One epoch: collect, score, advantages, optimise; returns its metrics."""
        timings = {"time/sampling": 0.0, "time/decoding": 0.0, "time/reward_wait": 0.0}
        start = time.perf_counter()
        trajectories, rewards = self.collect(epoch, timings)
        t0 = time.perf_counter()
        all_rewards, all_groups = self._gather(rewards), self._gather(trajectories.group_ids)
        keep, counts = self.finite_samples(all_rewards, all_groups, epoch)
        advantages = self.advantages(trajectories, rewards, keep)
        mine = self._local(keep)
        if not bool(mine.all()):
            trajectories, rewards = trajectories.select(mine), rewards[mine]
        t1 = time.perf_counter()
        stats = self.optimise(Batch(trajectories, rewards, advantages), epoch)
        t2 = time.perf_counter()
        self.lr_scheduler.step()
        metrics = {
            **tensor_stats("reward", all_rewards[torch.isfinite(all_rewards)]),
            **tensor_stats("advantage", advantages),
            **{k: v for name, scores in self.monitored.items() for k, v in tensor_stats(f"monitor/{name}", self._gather(scores)).items()},
            **counts,
            **stats,
            **timings,
            "time/advantages": t1 - t0,
            "time/training": t2 - t1,
            "time/epoch": t2 - start,
            "memory/peak_mb": peak_memory_mb(self.device),
            "lr": self.lr_scheduler.get_last_lr()[0],
        }
        return metrics

    def _checkpoint_parts(self) -> ckpt.Resumable:
        return ckpt.Resumable(self.unet, self.config.model.lora, self.optimizer, self.lr_scheduler, self.tracker,
                              self.ema, self.text_encoder)

    def check_weights(self, what: str) -> None:
        """Raise NonFiniteError (on every process) if a trainable weight or its EMA is non-finite, before
        writing ``what``."""
        if self.sharded:
            self._check_sharded_weights(what)
            return
        check_finite_weights(((name, p) for name, p in self.unet.named_parameters() if p.requires_grad), what)
        if self.ema is not None:
            check_finite_weights(((f"ema.{name}", t) for name, t in self.ema.average.items()), what)

    def _check_sharded_weights(self, what: str) -> None:
        """:meth:`check_weights` under FSDP: each process checks its shards, and one all-reduce tells every
        process which tensors are non-finite anywhere."""
        reshard(self.unet)
        named = [(name, p) for name, p in self.unet.named_parameters() if p.requires_grad]
        if self.ema is not None:
            named += [(f"ema.{name}", t) for name, t in self.ema.average.items()]
        bad_here = set(nonfinite_names((name, local(t)) for name, t in named))
        flags = torch.tensor([float(name in bad_here) for name, _ in named], device=self.device)
        bad = [name for (name, _), flag in zip(named, self.accelerator.reduce(flags, "sum").tolist()) if flag]
        weights = [name for name in bad if not name.startswith("ema.")]
        refuse_nonfinite_weights(weights or bad, what)

    def ema_weights(self) -> contextlib.AbstractContextManager:
        """Within the block the UNet holds the EMA of its trainable weights (``training.ema_decay``), its live
        weights again afterwards; without an EMA, or before the EMA's first update (an average that still holds
        the starting weights), its live weights throughout."""
        return self.ema.swapped_in() if self._ema_updated() else contextlib.nullcontext()

    def _ema_updated(self) -> bool:
        return self.ema is not None and self.ema.updates > 0

    def _warn_if_ema_unused(self, what: str) -> None:
        """On the main process, say on stderr that ``what`` holds the live weights because the EMA had no update."""
        if self.ema is not None and not self._ema_updated() and self.accelerator.is_main_process:
            print(f"warning: {what} holds the trained weights, not their EMA: no EMA update happened in "
                  f"{self.ema.steps} optimiser steps (training.ema_every={self.ema.every})", file=sys.stderr)

    def _ema_updates(self) -> int | None:
        return self.ema.updates if self.ema is not None else None

    def save(self) -> Path | None:
        """Checkpoint the finished epochs; refuses (NonFiniteError) when a trainable weight is non-finite.

        The main process writes; every process waits until the checkpoint is complete.
        """
        self.check_weights(f"the checkpoint of epoch {self.epoch}")
        path = None
        # under FSDP every process gathers its shards, under DeepSpeed its partition of the AdamW state
        if self.accelerator.is_main_process or self.sharded or self.deepspeed:
            extra = {"history": self.history, "config": self.config.to_dict()}
            path = ckpt.save_checkpoint(self.run_dir, self.epoch, self._checkpoint_parts(), extra,
                                        write=self.accelerator.is_main_process)
        self.accelerator.wait_for_everyone()
        return path

    def resume_point(self) -> Path | None:
        """The checkpoint to resume from, after checking that this config may continue it.

        Raises ConfigError naming the fields that changed but are fixed for a run's life, or when
        ``training.epochs`` is below the epochs already trained.
        """
        path = ckpt.latest_checkpoint(self.run_dir)
        if path is None:
            return None
        info = ckpt.read_info(path)
        changes = fixed_changes(info.get("config", {}), self.config)
        way_out = "start over with output.resume=false (removes its checkpoints) or use a new output.dir"
        if changes:
            raise ConfigError(f"output.dir='{self.run_dir}' holds a run with other settings that cannot change "
                              f"mid-run: {'; '.join(changes)}; rerun with the saved values, or {way_out}")
        epochs = self.config.training.epochs
        if epochs < info["epoch"]:
            raise ConfigError(f"training.epochs={epochs} is below the {info['epoch']} epochs already trained in "
                              f"'{self.run_dir}'; allowed: >= {info['epoch']}, or {way_out}")
        return path

    def resume(self) -> bool:
        """Restore the newest checkpoint of the run folder, if any (see :meth:`resume_point`)."""
        path = getattr(self, "_resume_path", None) or self.resume_point()
        if path is None:
            return False
        info = ckpt.load_checkpoint(path, self._checkpoint_parts())
        self.epoch = info["epoch"]
        self.history = info.get("history", [])
        if self.best is not None:
            self.best.replay(self.history)
        self.resumed = True
        if self.accelerator.is_main_process:
            print(f"resuming from epoch {self.epoch} ({path})", flush=True)
            self._truncate_metrics()
        return True

    def _truncate_metrics(self) -> None:
        """Drop the epochs logged after the resumed checkpoint (they are trained again)."""
        metrics_file = self.run_dir / "metrics.jsonl"
        if metrics_file.is_file():
            lines = [l for l in metrics_file.read_text().splitlines() if l and json.loads(l)["epoch"] <= self.epoch]
            metrics_file.write_text("".join(line + "\n" for line in lines))

    def start_over(self) -> None:
        """Remove the run folder's checkpoints and metrics (``output.resume=false``), on the main process."""
        if self.accelerator.is_main_process:
            for path in ckpt.checkpoint_folders(self.run_dir):
                ckpt.remove_checkpoint(path)
            (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()

    def evaluation_rewards(self) -> dict[str, RewardFn]:
        """The training reward plus ``eval.rewards``, built once (a reward model loads only once per run;
        one already built for ``reward.monitor`` is reused)."""
        if self._evaluation_rewards is None:
            rewards: dict[str, RewardFn] = {self.reward_name: self.reward_fn}
            for name in self.config.eval.rewards:
                if name not in rewards:
                    rewards[name] = self.monitor_rewards.get(name) or build_reward(name, self.config.reward.options)
            self._evaluation_rewards = rewards
        return self._evaluation_rewards

    def evaluate(self, tag: str, prompt_set: PromptSet | None = None, deterministic: bool = False) -> EvalResult:
        """Evaluate the current policy (its EMA weights when there is an EMA) on the validation prompts; writes
        ``eval/<tag>.json`` and a grid.

        ``deterministic`` samples without noise (DDIM eta = 0, or the flow ODE) and writes
        ``eval/<tag>_deterministic.json``: the sampler users run after fine-tuning."""
        e = self.config.eval
        policy = self.rollout_policy.deterministic() if deterministic else self.rollout_policy
        tag = f"{tag}_deterministic" if deterministic else tag
        if prompt_set is None and self.config.prompts.val is None:
            raise ConfigError("prompts.val is unset: give a validation prompt file to evaluate on")
        prompt_set = prompt_set or load_prompt_set(self.config.prompts.val).head(e.max_prompts)
        self._refresh_embeddings()
        self.unet.eval()
        with self.ema_weights(), self.accelerator.autocast():
            result = evaluate(
                policy,
                self.encoder,
                self.pipeline.vae,
                prompt_set,
                self.evaluation_rewards(),
                images_per_prompt=e.images_per_prompt,
                seed=e.seed,
                batch_size=self.config.sampling.batch_size,
                grid_prompts=e.grid_prompts,
                progress=self.config.output.progress,
            )
        if self.accelerator.is_main_process:
            out = self.run_dir / "eval"
            out.mkdir(parents=True, exist_ok=True)
            record = {"tag": tag, "epoch": self.epoch, **result.record()}
            if (warning := result.nonfinite_warning()) is not None:
                print(f"{tag}: {warning}", file=sys.stderr)
            (out / f"{tag}.json").write_text(json.dumps(record, indent=1))
            torch.save(result.grid_images, out / f"{tag}_grid.pt")
            n = len(result.grid_images)
            grid = save_grid(self.run_dir / "grids" / f"{tag}.png", list(result.grid_images[:, :4]), result.prompts[:n])
            self._log_image(f"eval/{tag}", grid)
        return result

    def _log_image(self, tag: str, path: Path | None) -> None:
        """The image grid at ``path`` to TensorBoard and wandb (``output.log_images_every`` > 0), at this epoch."""
        if self.logger is not None and path is not None and self.config.output.log_images_every > 0:
            from PIL import Image

            with Image.open(path) as image:
                self.logger.log_image(tag, image.convert("RGB"), self.epoch)

    def _log_samples(self) -> None:
        """Every ``output.log_images_every`` epochs, the epoch's first training samples with their prompts."""
        every = self.config.output.log_images_every
        if self.logger is None or self.shown_samples is None or not every or self.epoch % every:
            return
        from loopdiff.grids import image_grid

        images, prompts = self.shown_samples
        self.logger.log_image("train/samples", image_grid([image[None] for image in images], prompts), self.epoch)

    def comparison_grid(self, tags: tuple[str, str] = ("base", "final")) -> Path | None:
        """Side-by-side grid of two evaluations (same prompts, same seeds)."""
        files = [self.run_dir / "eval" / f"{tag}_grid.pt" for tag in tags]
        if not all(f.is_file() for f in files):
            return None
        try:
            grids = {tag: torch.load(f, weights_only=True) for tag, f in zip(tags, files)}
        except pickle.UnpicklingError as err:  # not a tensor file: never run what is inside it
            warnings.warn(f"no comparison grid: {files[0].parent} holds a grid file that is not plain tensors ({err})")
            return None
        prompts = json.loads((self.run_dir / "eval" / f"{tags[0]}.json").read_text())["prompts"]
        n = min(len(g) for g in grids.values())
        path = self.run_dir / "grids" / f"{tags[0]}_vs_{tags[1]}.png"
        return side_by_side(path, prompts[:n], {t: g[:n] for t, g in grids.items()}, per_model=3)

    def export(self) -> Path:
        """Final model: a diffusers pipeline folder (full fine-tune) or LoRA weights (``load_lora_weights``),
        with its model card (``README.md``: what it was trained from, how, on what, and how it evaluated).
        With an EMA (``training.ema_decay``) the exported weights are the EMA's; the live ones, with a warning,
        when the EMA had no update yet.

        Call it on every process: the main one writes into a temporary folder renamed into place when
        complete, the others wait for it.
        """
        path = self.run_dir / ("final_lora" if self.config.model.lora else "final_pipeline")
        self._warn_if_ema_unused(f"the export {path}")
        with self.ema_weights():
            self.check_weights("the exported model")
            gathered = self._gather_export() if self.sharded else None
            if self.accelerator.is_main_process:
                tmp = path.with_name(path.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                self._write_export(tmp, gathered)
                where = Path(hub_repo_id(self.config.output)) if self.config.output.push_to_hub else path
                card = model_card(self.config, self.estimator, self.reward_name, self.run_dir, self.epoch, where,
                                  pipeline_class_name(self.pipeline), ema_updates=self._ema_updates())
                (tmp / "README.md").write_text(card)
                shutil.rmtree(path, ignore_errors=True)
                tmp.rename(path)
        self.accelerator.wait_for_everyone()
        if self.best is not None and (self.run_dir / BEST_DIR / BEST_WEIGHTS).is_file():
            self.export_best()
        if self.config.output.push_to_hub and self.accelerator.is_main_process:
            url = push_export(path, self.config.output)
            print(f"uploaded {path} to {url}", flush=True)
        return path

    def save_best(self) -> None:
        """Write the trainable weights (the EMA's, when there is one) of this new best epoch to ``best/``."""
        with self.ema_weights():
            state = trainable_state_dict(self.accelerator.unwrap_model(self.train_unet), self.config.model.lora)
        if self.accelerator.is_main_process:
            save_kept_weights(self.run_dir / BEST_DIR, state, self.best)
        self.accelerator.wait_for_everyone()

    @contextlib.contextmanager
    def best_weights(self) -> Iterator[None]:
        """Within the block the policy holds the kept best weights (``best/``), its own weights again after."""
        unet = self.accelerator.unwrap_model(self.train_unet)
        lora = self.config.model.lora
        with self.ema_weights():
            # a copy: on the CPU the state dict's tensors are the parameters themselves, which the load overwrites
            current = {name: value.clone() for name, value in trainable_state_dict(unet, lora).items()}
            load_trainable_state_dict(unet, load_kept_weights(self.run_dir / BEST_DIR), lora)
            try:
                yield
            finally:
                load_trainable_state_dict(unet, current, lora)

    def export_best(self) -> Path:
        """Export the kept best weights beside the final model: ``best_lora/`` or ``best_pipeline/``, with a
        model card whose evaluation is ``eval/best.json``."""
        path = self.run_dir / ("best_lora" if self.config.model.lora else "best_pipeline")
        info = kept_info(self.run_dir / BEST_DIR)
        with self.best_weights():
            gathered = self._gather_export() if self.sharded else None
            if self.accelerator.is_main_process:
                tmp = path.with_name(path.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                self._write_export(tmp, gathered)
                note = (f" These are the weights of epoch {info['epoch']}, where `output.keep_best` "
                        f"(`{self.config.output.keep_best}`, mean over {self.best.window} epochs) peaked at "
                        f"{info['score']:.4f}.")
                card = model_card(self.config, self.estimator, self.reward_name, self.run_dir, info["epoch"], path,
                                  pipeline_class_name(self.pipeline), final_tag="best", note=note,
                                  ema_updates=self._ema_updates())
                (tmp / "README.md").write_text(card)
                shutil.rmtree(path, ignore_errors=True)
                tmp.rename(path)
        self.accelerator.wait_for_everyone()
        return path

    def _gather_export(self) -> dict[str, torch.Tensor]:
        """Under FSDP, what the export writes, gathered in full onto the main process (every process calls
        this): the LoRA adapter (peft format), or the whole denoiser's state dict."""
        if self.config.model.lora:
            return trainable_state_dict(self.unet, lora=True)
        return full_model_state_dict(self.unet)

    def _write_export(self, path: Path, gathered: dict[str, torch.Tensor] | None = None) -> None:
        """Write the export into ``path``; ``gathered`` is :meth:`_gather_export`'s output under FSDP."""
        unet = self.accelerator.unwrap_model(self.train_unet)
        if self.config.model.lora:
            from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            peft_layers = gathered if gathered is not None else get_peft_model_state_dict(unet)
            layers = convert_state_dict_to_diffusers(peft_layers)
            metadata = unet.peft_config["default"].to_dict()  # keeps lora_alpha, so the scale survives loading
            if is_flow_matching(self.pipeline):
                type(self.pipeline).save_lora_weights(
                    path, transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata,
                    safe_serialization=True,
                )
                return
            saver = StableDiffusionXLPipeline if is_sdxl(self.pipeline) else StableDiffusionPipeline
            text = {} if self.text_encoder is None else {
                "text_encoder_lora_layers": text_encoder_lora_layers(self.text_encoder),
                "text_encoder_lora_adapter_metadata": self.text_encoder.peft_config["default"].to_dict()}
            saver.save_lora_weights(
                path, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata, safe_serialization=True, **text
            )
            return
        name = "transformer" if is_flow_matching(self.pipeline) else "unet"
        if gathered is None:
            setattr(self.pipeline, name, unet)
            self.pipeline.save_pretrained(path)
            return
        setattr(self.pipeline, name, unsharded_copy(unet, gathered))  # diffusers saves a plain module
        try:
            self.pipeline.save_pretrained(path)
        finally:
            setattr(self.pipeline, name, unet)

    def train(self, on_epoch_end: Callable[[int, dict[str, float]], None] | None = None) -> list[dict[str, float]]:
        """Run (or resume) training to ``training.epochs``; evaluates before and after when asked."""
        c = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resumed = self.resumed or (c.output.resume and self.resume())
        if not resumed and not c.output.resume:
            self.start_over()
        if self.accelerator.is_main_process:  # the settings in force now (a resumed run may change some)
            (self.run_dir / "config.json").write_text(json.dumps(c.to_dict(), indent=2))
            record_launch(self.run_dir, self.launch_info(), resumed)
        if self.accelerator.is_main_process and c.prompts.val is None:
            print("note: prompts.val is unset, so the model is not evaluated before or after training", file=sys.stderr)
        reset_peak_memory(self.device)  # memory/peak_mb is this run's, not the process's earlier work's
        logger = MetricsLogger(
            self.run_dir, c.output.tensorboard, c.output.wandb, c.output.wandb_project, c.to_dict(),
            enabled=self.accelerator.is_main_process,
        )
        self.logger = logger
        try:
            if c.eval.before_training and not resumed and self._wants_eval():
                self.evaluate("base")
                if c.eval.deterministic:
                    self.evaluate("base", deterministic=True)
            bar = tqdm(range(self.epoch, c.training.epochs), desc="epochs", initial=self.epoch,
                       total=c.training.epochs, disable=not c.output.progress)
            for epoch in bar:
                metrics = self.run_epoch(epoch)
                self.epoch = epoch + 1
                self.history.append({"epoch": self.epoch, **metrics})
                logger.log(self.epoch, metrics)
                self._log_samples()
                bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}")
                if self.best is not None and self.best.update(self.epoch, metrics):
                    self.save_best()
                if on_epoch_end is not None:
                    on_epoch_end(self.epoch, metrics)
                if self.epoch % c.output.checkpoint_every == 0 or self.epoch == c.training.epochs:
                    self.save()
                if c.eval.every and self.epoch % c.eval.every == 0 and self.epoch < c.training.epochs \
                        and self._wants_eval():
                    self.evaluate(f"epoch_{self.epoch:05d}")
            if self._wants_eval():
                self.evaluate("final")
                if c.eval.deterministic:
                    self.evaluate("final", deterministic=True)
                if self.best is not None and self.best.best_epoch is not None:
                    with self.best_weights():
                        self.evaluate("best")
                if self.accelerator.is_main_process:
                    self._log_image("eval/base_vs_final", self.comparison_grid())
                    if self.best is not None:
                        plot_trade_off(self.run_dir / "grids" / "fidelity.png", self.history, self.best)
        finally:
            logger.close()
            self.logger = None
        return self.history

    def launch_info(self) -> dict[str, Any]:
        """How this launch runs (``run.json``): from which epoch, on how many processes, with which backend,
        device and mixed precision in use; says on stderr when the precision asked for does not run here."""
        acc, asked = self.accelerator, self.config.model.mixed_precision
        used = precision_in_use(asked, acc.native_amp, acc.distributed_type.value)
        if used != asked and acc.is_main_process:
            print(f"note: model.mixed_precision={asked} runs in fp32 on {self.device.type} (accelerate has no "
                  f"{asked} autocast there); run.json records it", file=sys.stderr)
        return {"start_epoch": self.epoch, "processes": acc.num_processes,
                "distributed_type": acc.distributed_type.value, "device": self.device.type,
                "mixed_precision_asked": asked, "mixed_precision_used": used}

    def _wants_eval(self) -> bool:
        return self.config.eval.max_prompts != 0 and self.config.prompts.val is not None
