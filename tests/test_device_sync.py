"""What running on a GPU needs and the CPU can check: sampling never reads a value back from the device, host
tensors reach a CUDA device through pinned memory without blocking, TF32 follows ``model.tf32``, and
``model.compile`` compiles the denoiser in place."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler

from tiny_pipelines import build_tiny_flux_pipeline, build_tiny_pipeline, build_tiny_sd3_pipeline, build_tiny_sdxl_pipeline
from trainer_helpers import make_trainer

from loopdiff.config import ModelConfig, SamplingConfig
from loopdiff.models import build_policies, configure_tf32, denoiser
from loopdiff.sampling import ddim, flow_sde
from loopdiff.sampling.trajectories import sample_trajectories
from loopdiff.transfer import to_device

BUILDERS = {"sd": build_tiny_pipeline, "sdxl": build_tiny_sdxl_pipeline, "sd3": build_tiny_sd3_pipeline,
            "flux": build_tiny_flux_pipeline}
READ_BACKS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


def sample_on_meta(family: str, steps: int, monkeypatch) -> dict:
    """Sample 2 trajectories of ``steps`` steps with the denoiser and prompt states on the meta device; count the
    read-backs from it and the host-to-device copies not made by ``to_device``."""
    pipe = BUILDERS[family]()
    if family == "sdxl":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # as load_pipeline gives it
    model = denoiser(pipe)
    policy, _, encoder = build_policies(pipe, model, model, SamplingConfig(num_steps=steps, eta=0.8),
                                        torch.device("cpu"))
    embeds, uncond = encoder(["a red circle", "a blue square"]), encoder.unconditional()
    meta = torch.device("meta")
    model.to(meta)
    embeds, uncond = embeds.to(meta), uncond.to(meta)
    reads, copies = [], []
    for name in READ_BACKS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            if self.device.type == "meta":
                reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    original_to = torch.Tensor.to

    def counted_to(self, *args, **kwargs):
        out = original_to(self, *args, **kwargs)
        if self.device.type == "cpu" and out.device.type == "meta" and \
                inspect.currentframe().f_back.f_code.co_name != "to_device":
            copies.append(tuple(self.shape))
        return out

    monkeypatch.setattr(torch.Tensor, "to", counted_to)
    latents, log_probs = sample_trajectories(policy, embeds, uncond, torch.Generator().manual_seed(0))
    monkeypatch.undo()
    return {"reads": reads, "copies": copies, "latents": latents, "log_probs": log_probs,
            "latent_shape": policy.latent_shape}


@pytest.mark.parametrize("family", BUILDERS)
def test_sampling_runs_on_the_meta_device_where_any_read_back_fails(family: str, monkeypatch) -> None:
    """On the meta device tensors have shapes and no values: reading one back (``.item()``, ``bool(t)``, a copy
    to the host) raises. A sampler that syncs with the device per step cannot run there; this one must, and
    must not even try (every read-back method is counted). Plain (pageable, blocking) host-to-device copies
    are made once per call, never per step: no more for 6 steps than for 3."""
    short, long = sample_on_meta(family, 3, monkeypatch), sample_on_meta(family, 6, monkeypatch)
    assert short["reads"] == [] and long["reads"] == []
    assert len(long["copies"]) <= len(short["copies"]) <= 4  # fewer when a cached copy (Flux's ids) is reused
    latents, log_probs = long["latents"], long["log_probs"]
    assert latents.device.type == "meta" and log_probs.device.type == "meta"
    assert latents.shape == (2, 6 + 1, *long["latent_shape"]) and log_probs.shape == (2, 6)


def test_zero_variance_schedule_is_refused_without_reading_the_device() -> None:
    scheduler = DDIMScheduler(set_alpha_to_one=True)
    scheduler.set_timesteps(5)
    x = torch.randn(1, 4, 8, 8, device="meta")
    with pytest.raises(ValueError, match="set_alpha_to_one"):  # checked on the host, from the schedule
        ddim.ddim_step_with_logprob(scheduler, x, scheduler.timesteps[2].to("meta"), x, eta=1.0)


def test_host_to_cuda_copy_is_pinned_and_non_blocking(monkeypatch) -> None:
    """No CUDA here: the calls ``to_device`` makes are recorded instead of run."""
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append(("pin",)) or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *args, **kwargs: calls.append(("to", args, kwargs)) or self)
    to_device(torch.zeros(3), "cuda:0")
    assert calls == [("pin",), ("to", (torch.device("cuda:0"),), {"non_blocking": True})]
    calls.clear()
    to_device(torch.zeros(3), "cpu")
    assert calls == [("to", (torch.device("cpu"),), {})]  # nothing to pin for a host target


@pytest.mark.parametrize("module, step", [(ddim, "ddim"), (flow_sde, "flow")])
def test_each_steps_noise_goes_through_to_device(module, step: str, monkeypatch) -> None:
    moved = []
    monkeypatch.setattr(module, "to_device", lambda t, device: moved.append((tuple(t.shape), device)) or t)
    x = torch.randn(2, 4, 8, 8)
    if step == "ddim":
        scheduler = DDIMScheduler(set_alpha_to_one=False, steps_offset=1)  # every step Gaussian
        scheduler.set_timesteps(4)
        ddim.ddim_step_with_logprob(scheduler, x, scheduler.timesteps[0], x, eta=1.0,
                                    generator=torch.Generator().manual_seed(0))
    else:
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        scheduler.set_timesteps(4)
        flow_sde.flow_step_with_logprob(scheduler, x, scheduler.timesteps[0], x, 0.7,
                                        generator=torch.Generator().manual_seed(0))
    assert moved == [((2, 4, 8, 8), x.device)]


@pytest.fixture
def float32_precision():
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.allow_tf32 = saved[1]


def test_tf32_follows_the_config_on_cuda_only(float32_precision) -> None:
    assert ModelConfig().tf32 is True
    configure_tf32(True, torch.device("cuda"))  # sets flags only: no GPU needed
    assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
    configure_tf32(False, torch.device("cuda"))
    assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
    configure_tf32(True, torch.device("cpu"))  # the CPU keeps exact float32
    assert torch.get_float32_matmul_precision() == "highest"


def test_trainer_applies_model_tf32(tmp_path: Path, monkeypatch) -> None:
    import loopdiff.training.trainer as trainer_module

    seen = []
    monkeypatch.setattr(trainer_module, "configure_tf32", lambda enabled, device: seen.append((enabled, device.type)))
    make_trainer(tmp_path / "on", "loop")
    make_trainer(tmp_path / "off", "loop", model={"device": "cpu", "tf32": False})
    assert seen == [(True, "cpu"), (False, "cpu")]


@pytest.mark.parametrize("on", [False, True])
def test_model_compile_compiles_the_denoiser_in_place(tmp_path: Path, monkeypatch, on: bool) -> None:
    compiled = []
    real_compile = torch.compile

    def eager_compile(fn, *args, **kwargs):  # the eager backend runs on any CPU, without a C compiler
        compiled.append(fn)
        return real_compile(fn, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    trainer = make_trainer(tmp_path, "loop", model={"device": "cpu", "compile": on})
    if not on:
        assert compiled == [] and trainer.unet._compiled_call_impl is None
        return
    assert len(compiled) == 1 and compiled[0].__self__ is trainer.unet  # the denoiser's own call, in place
    assert trainer.unet._compiled_call_impl is not None
    names = {name for name, _ in trainer.unet.named_parameters()}
    assert not any(name.startswith("_orig_mod") for name in names)  # checkpoints keep the module's names


def test_flux_position_ids_are_made_once_and_serve_training_too() -> None:
    from loopdiff.sampling.flux import latent_image_ids

    with torch.inference_mode():
        first = latent_image_ids(6, 8, torch.device("cpu"), torch.float32)
    again = latent_image_ids(6, 8, torch.device("cpu"), torch.float32)
    assert again is first and not first.is_inference()  # cached, and usable where autograd records
    assert first.shape == (3 * 4, 3) and first[:, 1].max() == 2 and first[:, 2].max() == 3


def test_training_moves_its_host_tensors_through_to_device(tmp_path: Path, monkeypatch) -> None:
    import loopdiff.training.loop as loop_module

    moved = []
    monkeypatch.setattr(loop_module, "to_device", lambda t, device: moved.append(tuple(t.shape)) or t.to(device))
    trainer = make_trainer(tmp_path, "loop")
    trainer.run_epoch(0)
    samples = trainer.config.training.samples_per_epoch
    assert (samples,) in moved  # the advantages, per micro-batch
    assert len(moved) % 3 == 0 and moved  # sample indices, step indices and advantages of every micro-batch


def _reads_while_optimising(tmp_path: Path, micro_batch_size: int, monkeypatch) -> tuple[int, int, int]:
    """One epoch's optimiser steps on the tiny pipeline: (read-backs from any tensor, read-backs made by the
    distributed backend, optimiser steps)."""
    from loopdiff.training.loop import Batch

    trainer = make_trainer(tmp_path / str(micro_batch_size), "loop", training={"micro_batch_size": micro_batch_size})
    traj, rewards = trainer.loop.collect(0)[:2]
    batch = Batch(traj, rewards, trainer.loop.advantages(rewards, traj.group_ids, traj.prompt_ids))
    reads, backend_reads = [], []
    for name in READ_BACKS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            if inspect.currentframe().f_back.f_code.co_filename.endswith("distributed.py"):
                backend_reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    stats = trainer.loop.optimise(batch, 0)
    monkeypatch.undo()
    return len(reads), len(backend_reads), int(stats["optimizer_steps"])


def test_an_optimiser_step_reads_the_device_once_whatever_its_micro_batches(tmp_path: Path, monkeypatch) -> None:
    """Each optimiser step reads one value back (whether its loss and gradient norm are finite everywhere); the
    loss statistics stay on the device until the epoch ends, so splitting a step into more micro-batches adds no
    read-back."""
    whole, whole_backend, steps = _reads_while_optimising(tmp_path, 64, monkeypatch)  # 1 micro-batch per step
    split, split_backend, same_steps = _reads_while_optimising(tmp_path, 2, monkeypatch)  # 3 per step
    assert steps == same_steps == 4
    assert whole_backend == split_backend == steps
    assert split == whole
