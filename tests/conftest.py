"""Shared fixtures: tiny Stable-Diffusion-format (and SDXL-, SD3- and Flux-format) pipelines (tiny_pipelines) saved
with save_pretrained, the shared data folder, one torch thread."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from tiny_pipelines import build_tiny_flux_pipeline, build_tiny_pipeline, build_tiny_sd3_pipeline, build_tiny_sdxl_pipeline

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _saved(tmp_path_factory: pytest.TempPathFactory, name: str, pipeline) -> Path:
    """``pipeline`` saved with save_pretrained into a new folder ``name`` (load it back with from_pretrained)."""
    path = tmp_path_factory.mktemp(name)
    pipeline.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny pipeline saved with save_pretrained (load it back with from_pretrained)."""
    return _saved(tmp_path_factory, "tiny-sd", build_tiny_pipeline())


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny StableDiffusionXLPipeline saved with save_pretrained (tiny_pipelines.build_tiny_sdxl_pipeline)."""
    return _saved(tmp_path_factory, "tiny-sdxl", build_tiny_sdxl_pipeline())


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny StableDiffusion3Pipeline saved with save_pretrained (tiny_pipelines.build_tiny_sd3_pipeline)."""
    return _saved(tmp_path_factory, "tiny-sd3", build_tiny_sd3_pipeline())


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny FluxPipeline saved with save_pretrained (tiny_pipelines.build_tiny_flux_pipeline)."""
    return _saved(tmp_path_factory, "tiny-flux", build_tiny_flux_pipeline())


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tests with one torch thread (scorer tests are faster so on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
