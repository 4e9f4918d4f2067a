"""The ``loopdiff`` command: train, config, sample, eval, branch, gradient-noise, rewards, pretrain, study."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

# packaged_config, requested_model, resolve_config and start_config stay importable from here
from loopdiff.config_files import packaged_config, packaged_config_names, requested_model, resolve_config, start_config
from loopdiff.plugins import registered_commands

TRAIN_EPILOG = """\
examples:
  loopdiff train                                   # LOOP (K=4) on the embedded world's aesthetic task
  loopdiff train --config embedded-color           # a packaged config, by name
  loopdiff train --config my.yaml training.epochs=50 estimator.preset=ppo
  loopdiff train --config sd2-compbench-attributes prompts.train=color_train.txt prompts.val=color_val.txt
  loopdiff train model.pretrained=stabilityai/stable-diffusion-2-base prompts.train=color_train.txt \\
      reward.name=my_rewards:score model.lora=true    # your own reward: package.module:function

A model other than 'embedded' starts from neutral defaults (never the embedded world's prompts or rewards)
and needs prompts.train and reward.name.

Any config field can be overridden as section.field=value; sections: model, sampling, estimator,
training, reward, prompts, eval, output. Presets: reinforce, reinforce_bc, rloo, ppo (= ddpo), loop, grpo.
Every field with its type, choices, default and help: loopdiff config fields; the config a run would use:
loopdiff config show [--config X] [section.field=value ...].
"""


def _user_errors() -> tuple[type[BaseException], ...]:
    from loopdiff.config import ConfigError
    from loopdiff.prompts import PromptError
    from loopdiff.rewards.base import RewardError
    from loopdiff.training.checkpoint import CheckpointError
    from loopdiff.training.preflight import LaunchError

    return (ConfigError, PromptError, RewardError, LaunchError, CheckpointError, FileNotFoundError)


def _run_errors() -> tuple[type[BaseException], ...]:
    """Errors that stop a run that was set up correctly (exit code 1)."""
    from loopdiff.rewards.base import RewardFailed
    from loopdiff.training.guards import NonFiniteError
    from loopdiff.training.hub import HubUploadError

    return (NonFiniteError, RewardFailed, HubUploadError)


# ---------------------------------------------------------------- train


def cmd_train(args: argparse.Namespace) -> int:
    from loopdiff.api import run_config
    from loopdiff.training.trainer import Trainer

    config = run_config(args.overrides, config_file=args.config)
    trainer = Trainer(config)
    trainer.train()
    path = trainer.export()  # on every process: the main one writes, the others wait for it
    if trainer.accelerator.is_main_process:
        from loopdiff.reports.run import build_run_report

        print(f"exported the fine-tuned model to {path}")
        _print_eval_summary(Path(config.output.dir))
        print(f"report: {build_run_report(Path(config.output.dir))}")
    return 0


def _print_eval_summary(run_dir: Path) -> None:
    base, final = run_dir / "eval" / "base.json", run_dir / "eval" / "final.json"
    if not (base.is_file() and final.is_file()):
        return
    from loopdiff.evaluation import paired_change

    before, after = json.loads(base.read_text()), json.loads(final.read_text())
    print("\nvalidation (mean over prompts of the per-prompt mean; change +- standard error over prompts):")
    print(f"  {'reward':24s} {'base':>8s} {'fine-tuned':>10s} {'change':>18s}")
    for name, value in before["means"].items():
        change, se = paired_change(before["per_prompt"][name], after["per_prompt"][name])
        base_mean, final_mean = (float("nan") if v is None else v for v in (value, after["means"][name]))
        print(f"  {name:24s} {base_mean:8.4f} {final_mean:10.4f} {change:+9.4f} +- {se:.4f}")
    print(f"grids: {run_dir / 'grids'}")


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from loopdiff.api import run_config
    from loopdiff.config import format_fields

    if args.action == "fields":
        print(format_fields())
    else:  # show: resolved as ``loopdiff train`` resolves it
        config = run_config(args.overrides, config_file=args.config, require_prompts=False)
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        if config.prompts.train is None:
            print("note: prompts.train is unset; loopdiff train needs it (a prompt file, one prompt per line)",
                  file=sys.stderr)
    return 0


# ---------------------------------------------------------------- sample and eval


def _load_for_inference(model: str, lora: str | None, device: str):
    from loopdiff.config import ModelConfig
    from loopdiff.models import load_pipeline

    pipe = load_pipeline(ModelConfig(pretrained=model))
    if lora:
        pipe.load_lora_weights(lora)
    return pipe.to(device)


def _policy_parts(pipe, args: argparse.Namespace):
    """The sampling policy and prompt encoder for the pipeline's kind, as the trainer builds them."""
    from loopdiff.config import SamplingConfig
    from loopdiff.models import build_policies, denoiser

    sampling = SamplingConfig(num_steps=args.steps, guidance_scale=args.guidance_scale, eta=args.eta,
                              sde_type=args.sde_type, resolution=args.resolution,
                              max_sequence_length=args.max_sequence_length, negative_prompt=args.negative_prompt)
    policy, _, encoder = build_policies(pipe, denoiser(pipe), denoiser(pipe), sampling, pipe.device)
    return policy, encoder


def _reward_options(args: argparse.Namespace) -> dict:
    """``--reward-options`` as a dict (``{}`` when absent), for the rewards ``--reward`` names only; bad JSON, a
    value that is no object of objects, or options for a reward not named are user errors naming the text."""
    from loopdiff.rewards.base import RewardError, parse_reward_spec

    if not args.reward_options:
        return {}
    text = args.reward_options
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise RewardError(f"--reward-options {text!r} is not JSON: {error}") from None
    if not isinstance(options, dict) or not all(isinstance(value, dict) for value in options.values()):
        raise RewardError(f"--reward-options {text!r}: expected an object of options per reward, e.g. "
                          '{"jpeg_compressibility": {"quality": 80}}')
    used = {args.reward, *(name for name, _ in parse_reward_spec(args.reward))}
    for name in options:
        if name not in used:
            raise RewardError(f"--reward-options has options for {name!r}, which --reward {args.reward!r} does not "
                              "name")
    return options


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from loopdiff.generation import generate, repeat_each
    from loopdiff.grids import save_grid

    pipe = _load_for_inference(args.model, args.lora, args.device)
    policy, encoder = _policy_parts(pipe, args)
    prompts = args.prompt
    repeated = repeat_each(prompts, args.num)
    generator = torch.Generator().manual_seed(args.seed)
    images = generate(policy, pipe.vae, encoder(repeated), encoder.unconditional(), generator, progress=True).images
    rows = list(images.view(len(prompts), args.num, *images.shape[1:]))
    path = save_grid(Path(args.out), rows, prompts)
    print(f"wrote {path}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from loopdiff.evaluation import evaluate
    from loopdiff.prompts import load_prompt_set
    from loopdiff.rewards.base import build_reward, parse_reward_spec

    missing = _model_defaults(args, "prompts.val")
    if missing:
        return _usage_error("eval", missing)
    prompt_set = load_prompt_set(args.prompts).head(args.max_prompts)  # bad prompts or rewards before the model loads
    options = _reward_options(args)
    rewards = {name: build_reward(name, options) for name, _ in parse_reward_spec(args.reward)}
    pipe = _load_for_inference(args.model, args.lora, args.device)
    policy, encoder = _policy_parts(pipe, args)
    result = evaluate(
        policy, encoder, pipe.vae, prompt_set, rewards, args.images_per_prompt, args.seed, batch_size=args.batch_size
    )
    for name, value in result.means.items():
        print(f"{name:24s} {value:.4f}  ({len(prompt_set)} prompts x {args.images_per_prompt} images)")
    if (warning := result.nonfinite_warning()) is not None:
        print(f"loopdiff eval: warning: {warning}", file=sys.stderr)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result.record(), indent=1, allow_nan=False))
    return 0


def _usage_error(command: str, message: str) -> int:
    print(f"loopdiff {command}: error: {message}", file=sys.stderr)
    return 2


def _model_defaults(args: argparse.Namespace, prompts: str) -> str | None:
    """Fill unset --prompts / --reward with the registered defaults of ``--model`` (the embedded world's:
    ``prompts`` names which of its prompt fields); for a model without them return the error naming the
    missing flag (None when nothing is missing)."""
    from loopdiff.plugins import registered_models

    models = registered_models()
    defaults = models[args.model].defaults if args.model in models else {}
    for flag, key in (("prompts", prompts), ("reward", "reward.name")):
        if getattr(args, flag) is None:
            if key not in defaults:
                with_defaults = " or ".join(f"'{m.name}'" for m in models.values() if key in m.defaults)
                return f"--{flag} is required for a model other than {with_defaults} (--model {args.model})"
            setattr(args, flag, defaults[key])
    return None


def _step_list(text: str) -> list[int]:
    """``"0,5,10"`` -> ``[0, 5, 10]`` for ``--at``."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--at {text!r}: expected comma-separated step numbers, e.g. 0,5,10")


def cmd_branch(args: argparse.Namespace) -> int:
    from loopdiff.prompts import load_prompt_set
    from loopdiff.rewards.base import build_reward
    from loopdiff.diagnostics.branching import reward_variance_by_step

    missing = _model_defaults(args, "prompts.train")
    if missing:
        return _usage_error("branch", missing)
    if args.every < 1:
        return _usage_error("branch", f"--every {args.every}: must be >= 1")
    steps = list(range(0, args.steps + 1, args.every)) if args.at is None else args.at
    if args.branches < 2:
        return _usage_error("branch", f"--branches {args.branches}: need at least 2 to measure a variance")
    outside = [s for s in steps if not 0 <= s <= args.steps]
    if outside:
        return _usage_error("branch", f"--at {outside}: steps must lie within 0..{args.steps} (--steps {args.steps})")
    pipe = _load_for_inference(args.model, args.lora, args.device)
    policy, encoder = _policy_parts(pipe, args)
    prompt_set = load_prompt_set(args.prompts).head(args.max_prompts)
    options = _reward_options(args)
    result = reward_variance_by_step(
        policy, encoder, pipe.vae, prompt_set, build_reward(args.reward, options), steps, args.branches, args.seed,
    )
    print(f"reward {args.reward!r}: variance across {args.branches} branches started after each step, "
          f"mean over {len(prompt_set)} prompts")
    print(f"  {'after step':>10s} {'variance':>10s} {'left':>7s} {'mean':>8s}")
    for step, var, left, mean in zip(result.steps, result.variance, result.remaining_fraction(), result.mean):
        print(f"  {step:10d} {var:10.5f} {left:7.1%} {mean:8.4f}")
    return 0


def cmd_gradient_noise(args: argparse.Namespace) -> int:
    from loopdiff.prompts import load_prompt_set
    from loopdiff.rewards.base import build_reward
    from loopdiff.diagnostics.gradient_noise import drawn_prompts, measure_gradient_noise

    missing = _model_defaults(args, "prompts.train")
    if missing:
        return _usage_error("gradient-noise", missing)
    if args.groups < 2 or args.samples_per_prompt < 2:
        return _usage_error("gradient-noise", f"--groups {args.groups} and --samples-per-prompt "
                            f"{args.samples_per_prompt}: both must be >= 2")
    from loopdiff.models import denoiser

    pipe = _load_for_inference(args.model, args.lora, args.device)
    denoiser(pipe).requires_grad_(True)  # the UNet, or an SD3 or Flux pipeline's transformer
    policy, encoder = _policy_parts(pipe, args)
    prompt_set = load_prompt_set(args.prompts)
    options = _reward_options(args)
    chosen = drawn_prompts(prompt_set, args.groups, args.seed)  # cycles when prompts < groups
    result = measure_gradient_noise(
        policy, encoder, pipe.vae, chosen, build_reward(args.reward, options), args.samples_per_prompt,
        args.train_denoising_steps, args.seed,
    )
    n = args.train_denoising_steps
    steps = "all steps" if n is None else f"the first {n} steps"
    print(f"{result.groups} groups of {args.samples_per_prompt}, reward {args.reward!r}, {steps}:")
    print(f"  |mean g|^2             {result.mean_sq:.4e}")
    print(f"  noise tr(Cov g)/G      {result.noise:.4e}")
    print(f"  signal^2 estimate      {result.signal_sq:.4e}")
    print(f"  groups for SNR 1       {result.groups_for_snr_one:.0f}")
    print(f"  {'by module':24s} {'|mean g|^2':>11s} {'noise':>11s} {'ratio':>6s}")
    for kind, part in result.by_module.items():
        ratio = part.mean_sq / part.noise if part.noise > 0 else math.inf
        print(f"  {kind:24s} {part.mean_sq:11.4e} {part.noise:11.4e} {ratio:6.2f}")
    return 0


# ---------------------------------------------------------------- rewards, pretrain, study


def cmd_rewards(args: argparse.Namespace) -> int:
    try:
        from loopdiff.rewards.catalog import format_reward_table
    except ImportError:
        from loopdiff.rewards.base import registered_rewards

        for name, info in registered_rewards().items():
            reason = info.unavailable_reason()
            print(f"{name:24s} {'ok' if reason is None else 'unavailable: ' + reason:40s} {info.description}")
        return 0
    print(format_reward_table())
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from loopdiff.reports.study_command import study_cli

    return study_cli(args.rest)


# ---------------------------------------------------------------- parser


def _as(path: str, what: str) -> str:
    """A flag's help: ``what``, the config field it mirrors and that field's default."""
    from loopdiff.config import field_default

    return f"{what} (as {path}; default {field_default(path)})"


def _mirrors(path: str, convert: Callable[[str], object] = int) -> Callable[[str], object]:
    """A flag's ``type=`` for a flag that mirrors the config field ``path``: its type and its declared range."""
    from loopdiff.checks import flag
    from loopdiff.config import field_check

    return flag(convert, field_check(path))


LORA_WEIGHTS = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")  # what save_lora_weights writes


def _lora_folder(text: str) -> bool:
    """Whether ``text`` is a folder holding LoRA weights as training exports them (final_lora/)."""
    return any((Path(text) / name).is_file() for name in LORA_WEIGHTS)


def _image_file(text: str) -> bool:
    """Whether ``text`` names an image file PIL can write (by its suffix), not a folder."""
    from PIL import Image

    return not Path(text).is_dir() and Path(text).suffix.lower() in Image.registered_extensions()


def _add_sampling_flags(parser: argparse.ArgumentParser, seed: int = 0, seed_help: str = "default 0") -> None:
    from loopdiff.checks import DEVICE_HERE, SEED, Check, at_least, flag
    from loopdiff.config import field_default

    parser.add_argument("--model", default=field_default("model.pretrained"),
                        help="'embedded', a pipeline folder or a Hub id (default embedded)")
    parser.add_argument("--lora", default=None, help="LoRA weights folder saved by training (final_lora)",
                        type=flag(str, Check(_lora_folder, f"a folder holding {' or '.join(LORA_WEIGHTS)} (a run's "
                                             "final_lora/)")))
    parser.add_argument("--steps", type=_mirrors("sampling.num_steps"), default=field_default("sampling.num_steps"),
                        help=_as("sampling.num_steps", "denoising steps (DDIM, or the SD3 / Flux flow sampler)"))
    parser.add_argument("--guidance-scale", type=_mirrors("sampling.guidance_scale", float),
                        default=field_default("sampling.guidance_scale"),
                        help=_as("sampling.guidance_scale", "classifier-free guidance (Flux: the embedded guidance)"))
    parser.add_argument("--negative-prompt", default=field_default("sampling.negative_prompt"),
                        help=_as("sampling.negative_prompt", "classifier-free guidance's unconditional prompt"))
    parser.add_argument("--eta", type=flag(float, at_least(0, "a number")), default=field_default("sampling.eta"),
                        help=_as("sampling.eta", "DDIM eta, or an SD3 / Flux pipeline's SDE noise level (0: its "
                                 "Euler ODE)"))
    parser.add_argument("--sde-type", choices=("sde", "cps"), default=field_default("sampling.sde_type"),
                        help=_as("sampling.sde_type", "SD3 and Flux pipelines only: the SDE form"))
    parser.add_argument("--max-sequence-length", type=_mirrors("sampling.max_sequence_length"),
                        default=field_default("sampling.max_sequence_length"),
                        help="T5 tokens per prompt of SD3 and Flux pipelines (as sampling.max_sequence_length; "
                        "default: the pipeline's)")
    parser.add_argument("--resolution", type=_mirrors("sampling.resolution"), default=field_default("sampling.resolution"),
                        help="image height and width in pixels (as sampling.resolution; default: the model's "
                        "native size)")
    parser.add_argument("--seed", type=flag(int, SEED), default=seed, help=f"seed of the sampling noise ({seed_help})")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)", type=flag(str, DEVICE_HERE))


def _add_training_prompt_and_reward_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", default=None,
                        help="prompt source (file or embedded:<cat>); default embedded:color for --model embedded")
    parser.add_argument("--reward", default=None, help="the reward to measure (a registered name or "
                        "package.module:function); default embedded_vqa for --model embedded")
    parser.add_argument("--reward-options", default=None, help='JSON: {"reward_name": {"option": value}}')


def _add_train(sub: Any) -> None:
    """The train command: a config (file or packaged name) and overrides."""
    train = sub.add_parser(
        "train", help="fine-tune a pipeline with RL", epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a Stable-Diffusion-format pipeline with RL. Without --config: LOOP on the "
        "embedded miniature world (aesthetic task), with a held-out evaluation of the base and fine-tuned model; "
        "for another model.pretrained, the neutral defaults. The export carries a model card (README.md).",
    )
    train.add_argument(
        "--config",
        help=f"YAML or TOML config file, or the name of a packaged one ({', '.join(packaged_config_names())}; "
        "default: embedded-aesthetic for the embedded model, none for any other)",
    )
    train.add_argument("overrides", nargs="*", metavar="section.field=value", help="config overrides")
    train.set_defaults(func=cmd_train)


def _add_sample(sub: Any) -> None:
    """The sample command: prompts into a grid image."""
    from loopdiff.checks import Check, at_least, flag

    sample = sub.add_parser("sample", help="draw images into a grid PNG")
    sample.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for more rows)")
    sample.add_argument("--num", type=flag(int, at_least(1)), default=4, help="images per prompt")
    sample.add_argument("--out", default="samples.png", help="output PNG (or another image format, by suffix)",
                        type=flag(str, Check(_image_file, "an image file path (.png, .jpg, ...), not a folder")))
    _add_sampling_flags(sample)
    sample.set_defaults(func=cmd_sample)


def _add_eval(sub: Any) -> None:
    """The eval command: the evaluation protocol of docs/method.md."""
    from loopdiff.checks import Check, at_least, flag
    from loopdiff.config import field_default

    evaluate = sub.add_parser(
        "eval", help="score a model on a prompt set (the evaluation protocol of docs/method.md)"
    )
    evaluate.add_argument("--prompts", default=None, help="prompt source (file or embedded:<cat>:val); "
                          "default embedded:color:val for --model embedded")
    evaluate.add_argument("--reward", default=None, help="reward name(s), comma separated; "
                          "default embedded_vqa for --model embedded")
    evaluate.add_argument("--reward-options", default=None, help='JSON: {"reward_name": {"option": value}}')
    evaluate.add_argument("--images-per-prompt", type=_mirrors("eval.images_per_prompt"),
                          default=field_default("eval.images_per_prompt"),
                          help=_as("eval.images_per_prompt", "images per prompt"))
    evaluate.add_argument("--max-prompts", type=flag(int, at_least(1)), default=field_default("eval.max_prompts"),
                          help="the first N prompts only (as eval.max_prompts; default all)")
    evaluate.add_argument("--out", default=None, help="write per-prompt scores to this JSON file",
                          type=flag(str, Check(lambda text: not Path(text).is_dir(), "a file path, not a folder")))
    evaluate.add_argument(
        "--batch-size", type=_mirrors("sampling.batch_size"), default=field_default("sampling.batch_size"),
        help=_as("sampling.batch_size", "images per sampling call; it fixes which noise each image gets, so equal "
                 "values (with --seed) reproduce a training run's evaluation"),
    )
    _add_sampling_flags(evaluate, field_default("eval.seed"), f"default {field_default('eval.seed')}, as eval.seed: "
                        "with --batch-size as the run's sampling.batch_size it reproduces the run's own evaluation")
    evaluate.set_defaults(func=cmd_eval)


def _add_branch(sub: Any) -> None:
    """The branch command: where in sampling the reward is decided."""
    from loopdiff.checks import at_least, flag

    branch = sub.add_parser(
        "branch", help="at which sampling step the reward is decided (to choose training.train_denoising_steps)",
        description="Sample one trajectory per prompt, restart the remaining steps several times from after "
        "each listed step, and print the reward's variance across these branches: what is still left to chance.",
    )
    _add_training_prompt_and_reward_flags(branch)
    branch.add_argument("--max-prompts", type=flag(int, at_least(1)), default=32)
    branch.add_argument("--branches", type=int, default=4, help="continuations per prompt and step (>= 2)")
    branch.add_argument("--every", type=int, default=2, help="branch after every this many steps (default 2)")
    branch.add_argument("--at", type=_step_list, default=None, help="comma-separated steps instead of --every, e.g. 0,5,10")
    _add_sampling_flags(branch)
    branch.set_defaults(func=cmd_branch)


def _add_gradient_noise(sub: Any) -> None:
    """The gradient-noise command: signal against noise over prompt groups."""
    from loopdiff.config import field_default
    from loopdiff.estimators import PRESETS

    noise = sub.add_parser(
        "gradient-noise", help="how much of the policy gradient is signal, over prompt groups",
        description="Sample one group of K trajectories per prompt, take leave-one-out advantages, and compare "
        "the squared norm of the mean group gradient with its noise part tr(Cov)/G.",
    )
    _add_training_prompt_and_reward_flags(noise)
    noise.add_argument("--groups", type=int, default=48,
                       help="one group per prompt drawn at random; prompts repeat when there are fewer than groups")
    k = PRESETS[field_default("estimator.preset")].samples_per_prompt
    noise.add_argument("--samples-per-prompt", type=int, default=k,
                       help=f"K (default {k}, the default estimator preset's)")
    noise.add_argument("--train-denoising-steps", "--first-steps", type=int,
                       default=field_default("training.train_denoising_steps"),
                       help="only the first N sampling steps (as training.train_denoising_steps; default all)")
    _add_sampling_flags(noise)
    noise.set_defaults(func=cmd_gradient_noise)


def _add_config(sub: Any) -> None:
    """The config command: its fields, or the config a run would use."""
    config = sub.add_parser(
        "config", help="the config fields, or the config a run would use",
        description="'fields': every config field with its type, choices, default and help. 'show': the config "
        "'loopdiff train' would run with the same --config and overrides, as YAML.",
    )
    actions = config.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("fields", help="every config field with its type, choices, default and help")
    show = actions.add_parser("show", help="the resolved config as YAML (defaults, --config, overrides)")
    show.add_argument("--config", help="YAML or TOML config file, or the name of a packaged one (as for train)")
    show.add_argument("overrides", nargs="*", metavar="section.field=value", help="config overrides")
    config.set_defaults(func=cmd_config)


def build_parser() -> argparse.ArgumentParser:
    from loopdiff.checks import OneLineParser

    parser = OneLineParser(
        prog="loopdiff",
        description="Reinforcement-learning fine-tuning of text-to-image diffusion models "
        "(LOOP, PPO/DDPO, RLOO, REINFORCE, GRPO) against black-box rewards.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    for add_command in (_add_train, _add_sample, _add_eval, _add_branch, _add_gradient_noise, _add_config):
        add_command(sub)
    rewards = sub.add_parser("rewards", help="list registered rewards and whether they can run here")
    rewards.set_defaults(func=cmd_rewards)

    for command in registered_commands().values():  # e.g. pretrain: they parse their own options
        sub.add_parser(command.name, help=command.help, add_help=False, description=command.description)

    study = sub.add_parser(
        "study", help="run a grid of training runs; tables, curves and an HTML report", add_help=False,
        description="Reproduce the paper's comparisons; run 'loopdiff study --help' for its options.",
    )
    study.set_defaults(func=cmd_study)

    return parser


DEBUG_ENV = "LOOPDIFF_DEBUG"  # set to 1: errors propagate with their traceback instead of one line
PASSTHROUGH: dict[str, Callable[[argparse.Namespace], int]] = {"study": cmd_study}


def _passthrough(command: str) -> Callable[[argparse.Namespace], int] | None:
    """The function of a command that parses its own options (including --help): a plugin's, or ``study``;
    None for any other."""
    plugin = registered_commands().get(command)
    if plugin is not None:
        return lambda args: plugin.run(args.rest)
    return PASSTHROUGH.get(command)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = _passthrough(argv[0]) if argv else None
    if passthrough is not None:  # these parse their own options (including --help)
        args = argparse.Namespace(command=argv[0], func=passthrough, rest=argv[1:])
    else:
        args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0
    try:
        return func(args)
    except (*_user_errors(), *_run_errors()) as error:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise  # the full traceback
        message = " ".join(str(error).split())  # one line, whatever the error's text holds
        hint = f" ({DEBUG_ENV}=1 shows the traceback)" if error.__cause__ is not None else ""
        print(f"loopdiff {args.command}: error: {message}{hint}", file=sys.stderr)
        return 1 if isinstance(error, _run_errors()) else 2


if __name__ == "__main__":
    sys.exit(main())
