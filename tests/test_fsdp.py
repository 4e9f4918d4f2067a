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

import shutil
import subprocess
from pathlib import Path

import pytest

from loopdiff.training import checkpoint as ckpt
from multiprocess_helpers import (
    EPOCHS,
    assert_checkpoints_close,
    assert_checkpoints_equal,
    assert_metrics_close,
    assert_weights_moved,
    check_full_export,
    check_lora_export,
    launch,
    needs_accelerate,
    read_metrics,
    read_ranks,
    read_state,
    read_weights,
    run_dir,
    untimed,
)

pytestmark = needs_accelerate
WORKER = Path(__file__).with_name("fsdp_worker.py")
# FSDP reduces gradients with a reduce-scatter, DDP with an all-reduce: the sums differ in the last bits, and
# AdamW, which divides by the gradients' running RMS, turns that into weight differences up to ~3e-5 after
# 4 steps of lr 1e-3 (on entries whose gradients are near zero). A missing or stale update is >= 1e-3.
ATOL = 2e-4


def _launch(backend: str, out: Path, epochs: int, *settings: str) -> subprocess.CompletedProcess:
    return launch(f"{backend}.yaml", str(WORKER), backend, str(out), str(epochs), *settings)


def _assert_sharded(out: Path) -> None:
    ranks = read_ranks(out)
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
    assert not read_ranks(full["ddp"])[0]["sharded"]
    metrics = read_metrics(full["fsdp"])
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert all(m["grad_norm"] > 0.1 and m["optimizer_steps"] == 4 and m["skipped_steps"] == 0 for m in metrics)
    assert_weights_moved(full["fsdp"])


def test_fsdp_trains_the_weights_ema_and_optimiser_state_of_ddp(full) -> None:
    for epoch in EPOCHS:  # the optimiser state is gathered into the unsharded format: same numbering and groups
        assert read_state(full["fsdp"], epoch)["ema"]["steps"] == 4 * int(epoch[-1])
        assert_checkpoints_close(full["fsdp"], full["ddp"], epoch, ATOL, 1e-5)
    assert_metrics_close(full["fsdp"], full["ddp"], ("reward/mean", "loss", "grad_norm", "approx_kl"))


def test_an_fsdp_checkpoint_resumes_exactly(full) -> None:
    _assert_sharded(full["resumed"])
    assert "resuming from epoch 1" in full["resumed_log"].read_text()
    for epoch in EPOCHS:
        assert_checkpoints_equal(full["resumed"], full["fsdp"], epoch)
    assert [untimed(m) for m in read_metrics(full["resumed"])] == [untimed(m) for m in read_metrics(full["fsdp"])]


def test_ddp_resumes_an_fsdp_checkpoint(full) -> None:
    assert not read_ranks(full["resumed_by_ddp"])[0]["sharded"]
    assert_checkpoints_close(full["resumed_by_ddp"], full["fsdp"], EPOCHS[1], ATOL, 1e-5)


def test_the_fsdp_export_is_a_diffusers_pipeline_holding_the_ema(full) -> None:
    check_full_export(full["fsdp"], full["ddp"], ATOL)


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
    assert [m["dropped_groups"] for m in read_metrics(sharded)] == [1, 0]
    for epoch in EPOCHS:
        assert all(".lora_" in name for name in read_weights(sharded, epoch))  # peft keys, as unsharded runs write
        assert_checkpoints_close(sharded, plain, epoch, ATOL, 1e-5)
    assert all(m["grad_norm"] > 0 for m in read_metrics(sharded))
    check_lora_export(sharded)


def test_an_fsdp_lora_checkpoint_resumes_exactly(lora) -> None:
    _assert_sharded(lora["resumed"])
    for epoch in EPOCHS:
        assert_checkpoints_equal(lora["resumed"], lora["fsdp"], epoch)
    assert [untimed(m) for m in read_metrics(lora["resumed"])] == [untimed(m) for m in read_metrics(lora["fsdp"])]


def test_a_nan_in_one_shard_stops_the_checkpoint_on_both_processes(lora) -> None:
    ranks = read_ranks(lora["fsdp"])
    refusal = f"refusing to write the checkpoint of epoch 2: non-finite weights in {ranks[0]['nan_parameter']}"
    assert ranks[0]["nan_check"] == ranks[1]["nan_check"] == refusal
    ckpt.verify(ckpt.checkpoint_dir(run_dir(lora["fsdp"]), 2))  # the last checkpoint still matches its manifest
