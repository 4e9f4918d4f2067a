"""The Python entry point: ``loopdiff.train(config_or_overrides, reward_fn=...)`` returns the run's history.

>>> import loopdiff
>>> history = loopdiff.train(["prompts.train=animals.txt", "training.epochs=3"],
...                          config_file="sd15-ddpo-aesthetic", reward_fn=my_reward)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from loopdiff.config import RunConfig, complete, load_config, parse_overrides, validate
from loopdiff.config_files import requested_model, start_config
from loopdiff.rewards.base import RewardFn

ConfigLike = RunConfig | Mapping[str, Any] | Sequence[str] | None


def run_config(config: ConfigLike = None, config_file: str | Path | None = None, pipeline: Any = None,
               require_prompts: bool = True) -> RunConfig:
    """The RunConfig that ``loopdiff train [--config config_file] overrides...`` would run.

    ``config``: a RunConfig (used as it is), a mapping of sections, or ``section.field=value`` overrides; both
    of the last two apply on top of ``config_file`` (a file or a packaged config's name), which defaults to the
    installed plugin's default config for its default model (unset or named) and to none for any other model.
    A ``pipeline`` passed in is the model when ``model.pretrained`` is not given: its folder or Hub id becomes
    ``model.pretrained``, so a pipeline other than the embedded one needs its own prompts, as any other model
    does. ``require_prompts`` false accepts an unset ``prompts.train`` (a config shown, not run).
    """
    if isinstance(config, RunConfig):
        validate(complete(config, require_prompts))
        return config
    values = dict(config) if isinstance(config, Mapping) else None
    overrides = list(config) if config is not None and values is None else []
    model = requested_model(parse_overrides(overrides)) or requested_model(values)
    if pipeline is not None and model is None:
        from loopdiff.models import pipeline_model_name

        model = pipeline_model_name(pipeline)
        values = values or {}
        values["model"] = {**dict(values.get("model") or {}), "pretrained": model}
    path = start_config(str(config_file) if config_file is not None else None, model)
    return load_config(path, overrides, values=values, require_prompts=require_prompts)


def train(
    config: ConfigLike = None,
    *,
    reward_fn: RewardFn | None = None,
    config_file: str | Path | None = None,
    pipeline: Any = None,
    export: bool = True,
) -> list[dict[str, float]]:
    """Train as ``loopdiff train`` does and return the per-epoch metrics (``metrics.jsonl``'s records).

    ``reward_fn`` (``(images, prompts, metadata) -> (N,) tensor``) replaces ``reward.name``; ``pipeline`` (a
    loaded diffusers pipeline) replaces ``model.pretrained``, which then names its folder or Hub id (see
    :func:`run_config`); ``export`` writes the final model with its model card into ``output.dir``. The run's
    ``report.html`` is written either way.
    """
    from loopdiff.training.trainer import Trainer

    trainer = Trainer(run_config(config, config_file, pipeline), reward_fn=reward_fn, pipeline=pipeline)
    history = trainer.train()
    if export:
        trainer.export()  # on every process: the main one writes, the others wait for it
    if trainer.accelerator.is_main_process:
        from loopdiff.reports.run import build_run_report

        build_run_report(trainer.run_dir)
    return history
