"""Training under FSDP2 (accelerate's path, with the shipped fsdp.yaml) on two CPU processes with gloo, checked
against the same training under DDP (the shipped ddp.yaml).

A CPU stand-in for GPUs: accelerate enables FSDP only on GPUs and other accelerators, and on the CPU it runs
an FSDP launch as plain data parallel. tests/fsdp_worker.py therefore sets the accelerator state's
distributed_type to FSDP by hand, with the FSDP plugin accelerate builds from the launch's fsdp.yaml
settings; ``accelerator.prepare`` then shards the UNet with torch's ``fully_shard`` as it does on GPUs, and
torch's FSDP2 runs on the CPU with gloo. Every run checks that it really was sharded (DTensor parameters,
each process holding its half of the weights, FSDP units per block).

Runs (each ``accelerate launch --num_processes 2``, LOOP on the tiny pipeline, an EMA, an evaluation after
epoch 1 with the EMA swapped in): FSDP for 2 epochs; DDP for 2 epochs; FSDP for 1 epoch, then resumed to 2
by FSDP and, from a copy, by DDP; and the same under LoRA (without the DDP resume) with one prompt group's
rewards NaN on one process in epoch 1, so that the processes hold different numbers of micro-batches.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_tiny_pipeline
from loopdiff.training import checkpoint as ckpt

pytestmark = pytest.mark.skipif(not Path(sys.executable).with_name("accelerate").exists(),
                                reason="the accelerate command is not available")
WORKER = Path(__file__).with_name("fsdp_worker.py")
EPOCHS = ("epoch_00001", "epoch_00002")
# FSDP reduces gradients with a reduce-scatter, DDP with an all-reduce: the sums differ in the last bits, and
# AdamW, which divides by the gradients' running RMS, turns that into weight differences up to ~3e-5 after
# 4 steps of lr 1e-3 (on entries whose gradients are near zero). A missing or stale update is >= 1e-3.
ATOL = 2e-4


def _launch(backend: str, out: Path, epochs: int, *settings: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(sys.path))
    config = str(resources.files("loopdiff") / "accelerate_configs" / f"{backend}.yaml")
    command = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file", config,
               "--num_processes", "2", str(WORKER), backend, str(out), str(epochs), *settings]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def _run(out: Path) -> Path:
    return out / "run-loop"


def _weights(out: Path, epoch: str) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.checkpoint_dir(_run(out), int(epoch[-5:])) / ckpt.WEIGHTS))


def _state(out: Path, epoch: str) -> dict:
    return torch.load(ckpt.checkpoint_dir(_run(out), int(epoch[-5:])) / ckpt.STATE, weights_only=True)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (_run(out) / "metrics.jsonl").read_text().splitlines()]


def _untimed(metrics: dict) -> dict:
    return {key: value for key, value in metrics.items() if not key.startswith(("time/", "memory/"))}


def _assert_close(ours: dict, theirs: dict, atol: float, what: str) -> None:
    assert ours.keys() == theirs.keys(), what
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=atol, msg=f"{what}: {name}")


def _assert_equal(ours: dict, theirs: dict, what: str) -> None:
    assert ours.keys() == theirs.keys(), what
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), f"{what}: {name}"


def _optimizer_moments(state: dict) -> dict[str, torch.Tensor]:
    return {f"{i}.{key}": value for i, entry in state["optimizer"]["state"].items() for key, value in entry.items()}


def _assert_sharded(out: Path) -> None:
    ranks = _ranks(out)
    for rank in ranks:
        assert rank["distributed_type"] == rank["distributed_type_at_end"] == "FSDP" and rank["fsdp2_at_end"]
        assert rank["sharded"] and rank["parameter_types"] == ["DTensor"] and rank["fsdp_units"] > 1
        assert rank["processes"] == 2 and rank["epoch"] == 2
    assert 0 < ranks[0]["local_numel"] < ranks[0]["numel"]  # each process holds only part of the weights
    assert ranks[0]["local_numel"] + ranks[1]["local_numel"] == ranks[0]["numel"]


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> dict[str, Path]:
    """Full fine-tuning: FSDP and DDP for 2 epochs; FSDP for 1 epoch resumed to 2 by FSDP and by DDP."""
    root = tmp_path_factory.mktemp("full")
    runs = {name: root / name for name in ("fsdp", "ddp", "resumed", "resumed_by_ddp")}
    _launch("fsdp", runs["fsdp"], 2)
    _launch("ddp", runs["ddp"], 2)
    work, first_epoch = root / "work", root / "first_epoch"  # a resumed run must keep its folder (and prompts)
    _launch("fsdp", work, 1)
    shutil.copytree(work, first_epoch)
    runs["resumed_log"] = root / "resumed.log"
    runs["resumed_log"].write_text(_launch("fsdp", work, 2).stdout)
    work.rename(runs["resumed"])
    first_epoch.rename(work)
    _launch("ddp", work, 2)
    work.rename(runs["resumed_by_ddp"])
    return runs


def test_the_fsdp_run_is_sharded_and_trains(full) -> None:
    _assert_sharded(full["fsdp"])
    assert not _ranks(full["ddp"])[0]["sharded"]
    metrics = _metrics(full["fsdp"])
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert all(m["grad_norm"] > 0.1 and m["optimizer_steps"] == 4 and m["skipped_steps"] == 0 for m in metrics)
    initial = build_tiny_pipeline(seed=0).unet.state_dict()
    final = _weights(full["fsdp"], EPOCHS[1])
    assert final.keys() == initial.keys()
    moved = sum(float((final[k] - initial[k]).abs().max() > 1e-3) for k in final)
    assert moved > 0.9 * len(final)  # AdamW moves (nearly) every tensor by ~lr per step


def test_fsdp_trains_the_weights_ema_and_optimiser_state_of_ddp(full) -> None:
    for epoch in EPOCHS:
        sharded, plain = _state(full["fsdp"], epoch), _state(full["ddp"], epoch)
        _assert_close(_weights(full["fsdp"], epoch), _weights(full["ddp"], epoch), ATOL, f"weights {epoch}")
        assert sharded["ema"]["steps"] == plain["ema"]["steps"] == 4 * int(epoch[-1])
        _assert_close(sharded["ema"]["average"], plain["ema"]["average"], ATOL, f"EMA {epoch}")
        # the optimiser state is gathered into the unsharded format: same parameter numbering and groups
        assert sharded["optimizer"]["param_groups"] == plain["optimizer"]["param_groups"]
        _assert_close(_optimizer_moments(sharded), _optimizer_moments(plain), 1e-5, f"AdamW state {epoch}")
    for ours, theirs in zip(_metrics(full["fsdp"]), _metrics(full["ddp"]), strict=True):
        for key in ("reward/mean", "loss", "grad_norm", "approx_kl"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key
    for tag in ("epoch_00001", "final"):  # evaluations with the EMA swapped in, the first one between epochs
        ours, theirs = (json.loads((_run(full[kind]) / "eval" / f"{tag}.json").read_text()) for kind in ("fsdp", "ddp"))
        assert ours["means"] == pytest.approx(theirs["means"], rel=1e-4)


def test_an_fsdp_checkpoint_resumes_exactly(full) -> None:
    _assert_sharded(full["resumed"])
    assert "resuming from epoch 1" in full["resumed_log"].read_text()
    straight, resumed = full["fsdp"], full["resumed"]
    for epoch in EPOCHS:
        _assert_equal(_weights(resumed, epoch), _weights(straight, epoch), f"weights {epoch}")
        ours, theirs = _state(resumed, epoch), _state(straight, epoch)
        _assert_equal(ours["ema"]["average"], theirs["ema"]["average"], f"EMA {epoch}")
        _assert_equal(_optimizer_moments(ours), _optimizer_moments(theirs), f"AdamW state {epoch}")
        ckpt.verify(ckpt.checkpoint_dir(_run(resumed), int(epoch[-5:])))
    assert [_untimed(m) for m in _metrics(resumed)] == [_untimed(m) for m in _metrics(straight)]


def test_ddp_resumes_an_fsdp_checkpoint(full) -> None:
    assert not _ranks(full["resumed_by_ddp"])[0]["sharded"]
    _assert_close(_weights(full["resumed_by_ddp"], EPOCHS[1]), _weights(full["fsdp"], EPOCHS[1]), ATOL, "weights")
    ours, theirs = _state(full["resumed_by_ddp"], EPOCHS[1]), _state(full["fsdp"], EPOCHS[1])
    _assert_close(ours["ema"]["average"], theirs["ema"]["average"], ATOL, "EMA")
    _assert_close(_optimizer_moments(ours), _optimizer_moments(theirs), 1e-5, "AdamW state")


def test_the_fsdp_export_is_a_diffusers_pipeline_holding_the_ema(full) -> None:
    from diffusers import StableDiffusionPipeline

    exported = StableDiffusionPipeline.from_pretrained(_run(full["fsdp"]) / "final_pipeline", safety_checker=None)
    ema = _state(full["fsdp"], EPOCHS[1])["ema"]["average"]
    _assert_equal(exported.unet.state_dict(), ema, "exported UNet vs the EMA")
    plain = StableDiffusionPipeline.from_pretrained(_run(full["ddp"]) / "final_pipeline", safety_checker=None)
    _assert_close(exported.unet.state_dict(), plain.unet.state_dict(), ATOL, "FSDP vs DDP export")
    images = [pipe("a red circle", num_inference_steps=3, height=32, width=32, output_type="pt",
                   generator=torch.Generator().manual_seed(0)).images for pipe in (exported, plain)]
    assert images[0].shape == (1, 3, 32, 32) and torch.isfinite(images[0]).all()
    torch.testing.assert_close(images[0], images[1], rtol=0, atol=1e-3)


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> dict[str, Path]:
    """LoRA, rank 1 losing a prompt group to NaN rewards in epoch 1: FSDP and DDP for 2 epochs (FSDP then
    finding a NaN in one shard at a last checkpoint); FSDP for 1 epoch, resumed to 2."""
    root = tmp_path_factory.mktemp("lora")
    runs = {name: root / name for name in ("fsdp", "ddp", "resumed")}
    settings = ("lora=1", "nan_rank1=1", "micro=2")
    runs["fsdp_log"], runs["ddp_log"] = root / "fsdp.log", root / "ddp.log"
    runs["fsdp_log"].write_text(_launch("fsdp", runs["fsdp"], 2, *settings, "nan_check=1").stderr)
    runs["ddp_log"].write_text(_launch("ddp", runs["ddp"], 2, *settings).stderr)
    _launch("fsdp", runs["resumed"], 1, *settings)
    _launch("fsdp", runs["resumed"], 2, *settings)
    return runs


def test_lora_under_fsdp_with_uneven_micro_batches_trains_as_ddp_and_exports(lora) -> None:
    """Rank 1 loses one prompt group (NaN rewards) in epoch 1, so per optimiser step it holds 3 pairs (2
    micro-batches of 2) to rank 0's 6 (3): under FSDP it pads with a weight-0 pass, else both would hang."""
    sharded, plain = lora["fsdp"], lora["ddp"]
    _assert_sharded(sharded)
    assert all("non-finite for 4 of 16 images in epoch 1" in lora[log].read_text() for log in ("fsdp_log", "ddp_log"))
    assert [m["dropped_groups"] for m in _metrics(sharded)] == [1, 0]
    for epoch in EPOCHS:
        ours, theirs = _weights(sharded, epoch), _weights(plain, epoch)
        assert ours and all(".lora_" in name for name in ours)  # peft keys, as an unsharded run writes them
        _assert_close(ours, theirs, ATOL, f"LoRA weights {epoch}")
        _assert_close(_state(sharded, epoch)["ema"]["average"], _state(plain, epoch)["ema"]["average"], ATOL,
                      f"LoRA EMA {epoch}")
    assert all(m["grad_norm"] > 0 for m in _metrics(sharded))
    moved = {k: v for k, v in _weights(sharded, EPOCHS[1]).items() if ".lora_B." in k}
    assert all(float(v.abs().max()) > 1e-4 for v in moved.values())  # lora_B starts at zero
    ema = _state(sharded, EPOCHS[1])["ema"]["average"]
    pipe = build_tiny_pipeline(seed=0)
    pipe.load_lora_weights(_run(sharded) / "final_lora")
    loaded = {k.replace(".default_0.", ".default."): v for k, v in pipe.unet.state_dict().items() if ".lora_" in k}
    _assert_equal(loaded, ema, "loaded LoRA vs the EMA")


def test_an_fsdp_lora_checkpoint_resumes_exactly(lora) -> None:
    _assert_sharded(lora["resumed"])
    for epoch in EPOCHS:
        _assert_equal(_weights(lora["resumed"], epoch), _weights(lora["fsdp"], epoch), f"LoRA weights {epoch}")
        ours, theirs = _state(lora["resumed"], epoch), _state(lora["fsdp"], epoch)
        _assert_equal(ours["ema"]["average"], theirs["ema"]["average"], f"LoRA EMA {epoch}")
        _assert_equal(_optimizer_moments(ours), _optimizer_moments(theirs), f"LoRA AdamW state {epoch}")
    assert [_untimed(m) for m in _metrics(lora["resumed"])] == [_untimed(m) for m in _metrics(lora["fsdp"])]


def test_a_nan_in_one_shard_stops_the_checkpoint_on_both_processes(lora) -> None:
    ranks = _ranks(lora["fsdp"])
    refusal = f"refusing to write the checkpoint of epoch 2: non-finite weights in {ranks[0]['nan_parameter']}"
    assert ranks[0]["nan_check"] == ranks[1]["nan_check"] == refusal
    ckpt.verify(ckpt.checkpoint_dir(_run(lora["fsdp"]), 2))  # the last checkpoint still matches its manifest
