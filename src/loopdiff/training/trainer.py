"""The trainer: wires the models, the processes and the run folder around the epoch loop.

Per epoch (:class:`loopdiff.training.loop.EpochLoop`): sample prompts x K trajectories without gradients ->
decode -> rewards (in a worker thread, overlapping the next sampling chunk) -> advantages -> inner epochs of
shuffled minibatches over (sample, step) pairs, recomputing log pi with gradients -> clipped AdamW steps (each
followed by the EMA update with ``training.ema_decay``). Around it the trainer checkpoints and resumes
(:mod:`~loopdiff.training.checkpoint`), evaluates before and after (:mod:`~loopdiff.evaluation`), keeps the
best trade-off (:mod:`~loopdiff.training.best`) and exports (:mod:`~loopdiff.training.export`). Evaluations and
the export use the EMA weights when there is an EMA.

The sampling and the training policy share one denoiser. Under DDP the training policy calls it through the
DDP wrapper and sampling calls the module itself; under FSDP2 ``accelerator.prepare`` shards the module in
place, and both call the sharded module (what changes then is in :mod:`loopdiff.sharding`). Under DeepSpeed ZeRO-2
the training policy calls the DeepSpeed engine, which also takes the optimiser step (:mod:`loopdiff.training.zero`).
How the processes take part in a step is :class:`loopdiff.training.distributed.Backend`'s.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from loopdiff.config import ConfigError, RunConfig, build_estimator, complete, parse_trade_off
from loopdiff.evaluation import EvalResult, evaluate
from loopdiff.models import (
    ReferencePolicy,
    build_policies,
    check_passed_pipeline,
    compile_denoiser,
    configure_attention,
    configure_tf32,
    configure_trainable,
    denoiser,
    load_pipeline,
    load_trainable_state_dict,
    pipeline_class_name,
    text_encoders,
    trainable_state_dict,
)
from loopdiff.plugins import registered_models
from loopdiff.prompts import PromptSet, load_prompt_set
from loopdiff.rewards.base import RewardFn, build_reward
from loopdiff.sharding import is_sharded
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
from loopdiff.training.distributed import Backend
from loopdiff.training.ema import ParameterEMA
from loopdiff.training.eval_records import comparison_grid, write_evaluation
from loopdiff.training.export import export_folder, export_model, gather_export, write_export
from loopdiff.training.hub import hub_repo_id, push_export
from loopdiff.training.launches import precision_in_use, record_launch
from loopdiff.training.loop import EpochLoop, Models
from loopdiff.training.lr_schedule import epoch_lr_scheduler
from loopdiff.training.metrics import MetricsLogger, reset_peak_memory
from loopdiff.training.model_card import model_card
from loopdiff.training.preflight import check_before_loading, check_reward_prompts
from loopdiff.training.text_encoder_lora import add_text_encoder_lora, check_text_encoder_training
from loopdiff.training.zero import quiet_cpu_accelerator_notice, zero_optimizer


def training_reward_name(config: RunConfig, reward_fn: RewardFn | None) -> str:
    """The training reward's name in logs and evaluations: a passed ``reward_fn``'s own (the function's, or
    its class's), else ``reward.name``, which a model without a registered default reward must set."""
    if reward_fn is not None:
        return getattr(reward_fn, "__name__", type(reward_fn).__name__)
    if config.reward.name is None:
        models = registered_models().values()
        with_defaults = " or ".join(f"'{m.name}'" for m in models if "reward.name" in m.defaults) or "a registered one"
        raise ConfigError(
            f"reward.name is required for a model other than {with_defaults} (model.pretrained="
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
        self.accelerator = Accelerator(mixed_precision=config.model.mixed_precision, cpu=config.model.device == "cpu")
        self.device = self.accelerator.device
        self.run_dir = Path(config.output.dir)
        check_before_loading(self.config, self.accelerator)  # fail fast, before the model loads
        self._resume_path = ckpt.resume_point(self.run_dir, self.config) if self.config.output.resume else None
        self.train_prompts = load_prompt_set(config.prompts.train).head(config.prompts.max_train)
        check_reward_prompts(config, self._scored_prompt_sets(), training_reward=reward_fn is None)
        self.reward_fn = reward_fn or build_reward(self.reward_name, config.reward.options)
        self.monitor_rewards = {name: build_reward(name, config.reward.options) for name in config.reward.monitor}
        self._evaluation_rewards: dict[str, RewardFn] | None = None
        self._setup_model(pipeline)
        self._setup_optimiser()
        self.loop = EpochLoop(self.config, self.estimator, self.models, self.backend, self.train_prompts,
                              self.reward_fn, self.reward_name, self.monitor_rewards)
        self.epoch = 0
        self.history: list[dict[str, float]] = []
        o = config.output
        self.best = BestKeeper(parse_trade_off(o.keep_best), o.keep_best_window) if o.keep_best else None
        if self.best is not None and self.sharded:
            raise ConfigError(f"output.keep_best={o.keep_best!r} needs unsharded weights; it is not available "
                              "under FSDP (use DDP or DeepSpeed ZeRO-2, or unset output.keep_best)")
        self.resumed = False
        self.logger: MetricsLogger | None = None  # while train() runs

    # ------------------------------------------------------------------ setup

    def _scored_prompt_sets(self) -> dict[str, PromptSet]:
        """The prompt sets the rewards score (validation only when it is evaluated)."""
        sets = {"train": self.train_prompts}
        if self._wants_eval():
            sets["val"] = load_prompt_set(self.config.prompts.val).head(self.config.eval.max_prompts)
        return sets

    def _setup_model(self, pipeline: Any) -> None:
        """Load the pipeline onto the device and make its denoiser (and text encoder's LoRA) trainable."""
        config = self.config
        self.pipeline = pipe = pipeline if pipeline is not None else load_pipeline(config.model)
        pipe.vae.to(self.device)
        for encoder in text_encoders(pipe):
            encoder.to(self.device)
        self.unet = denoiser(pipe).to(self.device)  # the UNet, or an SD3 or Flux pipeline's transformer
        configure_attention(self.unet, config.model.attention, self.device)
        configure_tf32(config.model.tf32, self.device)
        self._trainable = configure_trainable(self.unet, config.model)
        self.text_encoder = pipe.text_encoder if config.model.train_text_encoder else None  # trained with LoRA
        if self.text_encoder is not None:
            check_text_encoder_training(config, pipe, self.accelerator.num_processes, self.estimator.kl_coef)
            self._trainable += add_text_encoder_lora(self.text_encoder, config.model)
        if config.training.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()  # only in train mode with gradients: sampling is unchanged
        if config.model.compile:
            compile_denoiser(self.unet)
        self.reference = ReferencePolicy(self.unet, config.model.lora) if self.estimator.kl_coef > 0 else None

    def _setup_optimiser(self) -> None:
        """AdamW and its LR schedule, prepared by accelerate with the denoiser; the EMA, the two policies over the
        prepared denoiser, and the backend of the training steps."""
        t = self.config.training
        fused = {"fused": True} if self.device.type in ("cpu", "cuda") else {}
        optimizer = torch.optim.AdamW(self._trainable, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                      eps=t.adam_eps, weight_decay=t.weight_decay, **fused)
        self.lr_scheduler = epoch_lr_scheduler(optimizer, t.lr_scheduler, t.warmup_epochs, t.epochs)
        self.train_unet, self.optimizer = self.accelerator.prepare(self.unet, optimizer)
        # FSDP2 shards the module in place (its parameters become DTensor shards): from here on it is the
        # sharded module, which sampling must call too so that its forward passes gather the weights.
        self.sharded = is_sharded(self.accelerator.unwrap_model(self.train_unet))
        if self.sharded:
            self.unet = self.accelerator.unwrap_model(self.train_unet)
        # Under DeepSpeed the prepared module is a ZeRO-2 engine and the optimiser a ZeRO optimiser: the engine
        # takes the optimiser steps (see Backend.accumulate and Backend.step_if_finite).
        self.deepspeed = zero_optimizer(self.optimizer) is not None
        # What the optimiser steps: the prepared module's parameters (FSDP2 replaced the ones above; under DDP
        # and DeepSpeed they are the same objects).
        self.params = [p for p in self.train_unet.parameters() if p.requires_grad]
        if self.text_encoder is not None:
            self.params += [p for p in self.text_encoder.parameters() if p.requires_grad]
        self.ema = ParameterEMA(self.unet, t.ema_decay, t.ema_every) if t.ema_decay else None
        # The same weights twice: sampled from without gradients, and trained through the accelerate wrapper.
        # DiffusionPolicy + PromptEncoder (SDXLPromptEncoder for SDXL), FlowMatchPolicy + SD3PromptEncoder
        # for an SD3 pipeline, FluxPolicy + FluxPromptEncoder for a Flux one.
        self.rollout_policy, self.train_policy, self.encoder = build_policies(
            self.pipeline, self.unet, self.train_unet, self.config.sampling, self.device
        )
        self.models = Models(self.pipeline, self.unet, self.rollout_policy, self.train_policy, self.encoder,
                             self.reference, self.text_encoder, self.ema)
        self.backend = Backend(self.accelerator, self.train_unet, self.optimizer, self.params, self.sharded,
                               self.deepspeed, t.max_grad_norm)

    @property
    def uncond(self) -> torch.Tensor:
        """The negative prompt's embedding that classifier-free guidance uses."""
        return self.models.uncond

    @property
    def monitored(self) -> dict[str, torch.Tensor]:
        """The last epoch's ``reward.monitor`` scores of this process's samples, by reward name."""
        return self.loop.monitored

    # ------------------------------------------------------------------ epochs

    def run_epoch(self, epoch: int) -> dict[str, float]:
        """One epoch of the loop, then the LR schedule's step; returns its metrics."""
        metrics = self.loop.run(epoch)
        self.lr_scheduler.step()
        return {**metrics, "lr": self.lr_scheduler.get_last_lr()[0]}

    def train(self, on_epoch_end: Callable[[int, dict[str, float]], None] | None = None) -> list[dict[str, float]]:
        """Run (or resume) training to ``training.epochs``; evaluates before and after when asked."""
        c = self.config
        resumed = self._open_run()
        self.logger = MetricsLogger(self.run_dir, c.output.tensorboard, c.output.wandb, c.output.wandb_project,
                                    c.to_dict(), enabled=self.accelerator.is_main_process)
        try:
            if c.eval.before_training and not resumed and self._wants_eval():
                self._evaluate_both("base")
            bar = tqdm(range(self.epoch, c.training.epochs), desc="epochs", initial=self.epoch,
                       total=c.training.epochs, disable=not c.output.progress)
            for epoch in bar:
                metrics = self.run_epoch(epoch)
                self.epoch = epoch + 1
                self._after_epoch(metrics)
                bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}")
                if on_epoch_end is not None:
                    on_epoch_end(self.epoch, metrics)
                self._checkpoint_and_evaluate()
            if self._wants_eval():
                self._evaluate_after_training()
        finally:
            self.logger.close()
            self.logger = None
        return self.history

    def _open_run(self) -> bool:
        """Resume the run folder's run or start it over; record the settings and this launch. Returns whether
        the run resumed."""
        c = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resumed = self.resumed or (c.output.resume and self.resume())
        if not resumed and not c.output.resume:
            self.start_over()
        if self.accelerator.is_main_process:  # the settings in force now (a resumed run may change some)
            (self.run_dir / "config.json").write_text(json.dumps(c.to_dict(), indent=2))
            record_launch(self.run_dir, self.launch_info(), resumed)
            if c.prompts.val is None:
                print("note: prompts.val is unset, so the model is not evaluated before or after training",
                      file=sys.stderr)
        reset_peak_memory(self.device)  # memory/peak_mb is this run's, not the process's earlier work's
        return bool(resumed)

    def _after_epoch(self, metrics: dict[str, float]) -> None:
        """Log the finished epoch (and its samples), and keep its weights if it is the best trade-off yet."""
        self.history.append({"epoch": self.epoch, **metrics})
        self.logger.log(self.epoch, metrics)
        self._log_samples()
        if self.best is not None and self.best.update(self.epoch, metrics):
            self.save_best()

    def _checkpoint_and_evaluate(self) -> None:
        """Checkpoint every ``output.checkpoint_every`` epochs and at the end; evaluate every ``eval.every``."""
        c = self.config
        if self.epoch % c.output.checkpoint_every == 0 or self.epoch == c.training.epochs:
            self.save()
        if c.eval.every and self.epoch % c.eval.every == 0 and self.epoch < c.training.epochs and self._wants_eval():
            self.evaluate(f"epoch_{self.epoch:05d}")

    def _evaluate_after_training(self) -> None:
        """The final evaluations, the kept weights' and the grids comparing them with the base."""
        self._evaluate_both("final")
        if self.best is not None and self.best.best_epoch is not None:
            with self.best_weights():
                self.evaluate("best")
        if self.accelerator.is_main_process:
            self._log_image("eval/base_vs_final", comparison_grid(self.run_dir))
            if self.best is not None:
                plot_trade_off(self.run_dir / "grids" / "fidelity.png", self.history, self.best)

    def _evaluate_both(self, tag: str) -> None:
        """Evaluate with the stochastic sampler and, with ``eval.deterministic``, without noise too."""
        self.evaluate(tag)
        if self.config.eval.deterministic:
            self.evaluate(tag, deterministic=True)

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

    # ------------------------------------------------------------------ weights: EMA, checkpoints, kept best

    def check_weights(self, what: str) -> None:
        """Raise NonFiniteError (on every process) if a trainable weight or its EMA is non-finite, before
        writing ``what``."""
        named = [(name, p) for name, p in self.unet.named_parameters() if p.requires_grad]
        if self.ema is not None:
            named += [(f"ema.{name}", t) for name, t in self.ema.average.items()]
        self.backend.check_weights(named, what, self.unet)

    def ema_weights(self) -> contextlib.AbstractContextManager:
        """Within the block the UNet holds the EMA of its trainable weights (``training.ema_decay``), its live
        weights again afterwards; without an EMA, or before the EMA's first update (an average that still holds
        the starting weights), its live weights throughout."""
        return self.ema.swapped_in() if self._ema_updated() else contextlib.nullcontext()

    def _ema_updated(self) -> bool:
        return self.ema is not None and self.ema.updates > 0

    def _ema_updates(self) -> int | None:
        return self.ema.updates if self.ema is not None else None

    def _warn_if_ema_unused(self, what: str) -> None:
        """On the main process, say on stderr that ``what`` holds the live weights because the EMA had no update."""
        if self.ema is not None and not self._ema_updated() and self.accelerator.is_main_process:
            print(f"warning: {what} holds the trained weights, not their EMA: no EMA update happened in "
                  f"{self.ema.steps} optimiser steps (training.ema_every={self.ema.every})", file=sys.stderr)

    def _checkpoint_parts(self) -> ckpt.Resumable:
        return ckpt.Resumable(self.unet, self.config.model.lora, self.optimizer, self.lr_scheduler,
                              self.loop.advantage_fn, self.ema, self.text_encoder)

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

    def resume(self) -> bool:
        """Restore the newest checkpoint of the run folder, if any (see :func:`checkpoint.resume_point`)."""
        path = getattr(self, "_resume_path", None) or ckpt.resume_point(self.run_dir, self.config)
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
            ckpt.truncate_metrics(self.run_dir, self.epoch)
        return True

    def start_over(self) -> None:
        """Remove the run folder's checkpoints and metrics (``output.resume=false``), on the main process."""
        if self.accelerator.is_main_process:
            ckpt.start_over(self.run_dir)
        self.accelerator.wait_for_everyone()

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

    # ------------------------------------------------------------------ evaluation

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
        self.models.refresh_embeddings()
        self.unet.eval()
        with self.ema_weights(), self.accelerator.autocast():
            result = evaluate(policy, self.encoder, self.pipeline.vae, prompt_set, self.evaluation_rewards(),
                              images_per_prompt=e.images_per_prompt, seed=e.seed,
                              batch_size=self.config.sampling.batch_size, grid_prompts=e.grid_prompts,
                              progress=self.config.output.progress)
        if self.accelerator.is_main_process:
            self._log_image(f"eval/{tag}", write_evaluation(self.run_dir, tag, self.epoch, result))
        return result

    def _log_image(self, tag: str, path: Path | None) -> None:
        """The image grid at ``path`` to TensorBoard and wandb (``output.log_images_every`` > 0), at this epoch."""
        if self.logger is not None and path is not None and self.config.output.log_images_every > 0:
            from PIL import Image

            with Image.open(path) as image:
                self.logger.log_image(tag, image.convert("RGB"), self.epoch)

    def _log_samples(self) -> None:
        """Every ``output.log_images_every`` epochs, the epoch's first training samples with their prompts."""
        every, shown = self.config.output.log_images_every, self.loop.shown_samples
        if self.logger is None or shown is None or not every or self.epoch % every:
            return
        from loopdiff.grids import image_grid

        images, prompts = shown
        self.logger.log_image("train/samples", image_grid([image[None] for image in images], prompts), self.epoch)

    # ------------------------------------------------------------------ export

    def export(self) -> Path:
        """Final model: a diffusers pipeline folder (full fine-tune) or LoRA weights (``load_lora_weights``),
        with its model card (``README.md``: what it was trained from, how, on what, and how it evaluated).
        With an EMA (``training.ema_decay``) the exported weights are the EMA's; the live ones, with a warning,
        when the EMA had no update yet.

        Call it on every process: the main one writes into a temporary folder renamed into place when
        complete, the others wait for it.
        """
        path = export_folder(self.run_dir, self.config.model.lora)
        self._warn_if_ema_unused(f"the export {path}")
        with self.ema_weights():
            self.check_weights("the exported model")
            self._export(path, lambda: model_card(
                self.config, self.estimator, self.reward_name, self.run_dir, self.epoch, self._card_path(path),
                pipeline_class_name(self.pipeline), ema_updates=self._ema_updates()))
        if self.best is not None and (self.run_dir / BEST_DIR / BEST_WEIGHTS).is_file():
            self.export_best()
        if self.config.output.push_to_hub and self.accelerator.is_main_process:
            url = push_export(path, self.config.output)
            print(f"uploaded {path} to {url}", flush=True)
        return path

    def _card_path(self, path: Path) -> Path:
        """Where the model card says the export lives: the Hub repository it is pushed to, else ``path``."""
        return Path(hub_repo_id(self.config.output)) if self.config.output.push_to_hub else path

    def export_best(self) -> Path:
        """Export the kept best weights beside the final model: ``best_lora/`` or ``best_pipeline/``, with a
        model card whose evaluation is ``eval/best.json``."""
        path = export_folder(self.run_dir, self.config.model.lora, "best")
        info = kept_info(self.run_dir / BEST_DIR)
        note = (f" These are the weights of epoch {info['epoch']}, where `output.keep_best` "
                f"(`{self.config.output.keep_best}`, mean over {self.best.window} epochs) peaked at "
                f"{info['score']:.4f}.")
        with self.best_weights():
            self._export(path, lambda: model_card(
                self.config, self.estimator, self.reward_name, self.run_dir, info["epoch"], path,
                pipeline_class_name(self.pipeline), final_tag="best", note=note, ema_updates=self._ema_updates()))
        return path

    def _export(self, path: Path, card: Callable[[], str]) -> None:
        """Write the policy's current weights to ``path`` with the model card ``card()`` (every process calls
        this: under FSDP all gather the weights, then the main process writes and the others wait)."""
        lora = self.config.model.lora
        gathered = gather_export(self.unet, lora) if self.sharded else None
        if self.accelerator.is_main_process:
            unet = self.accelerator.unwrap_model(self.train_unet)
            export_model(path, lambda tmp: write_export(tmp, self.pipeline, unet, lora, self.text_encoder, gathered),
                         card)
        self.accelerator.wait_for_everyone()
