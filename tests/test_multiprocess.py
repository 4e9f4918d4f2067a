"""Two processes through accelerate (gloo on CPU): ranks sample different data yet keep identical weights."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not available")
def test_two_processes_keep_gradients_in_sync(tmp_path) -> None:
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    worker = Path(__file__).with_name("ddp_worker.py")
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", str(worker), str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["processes"] == 2 for r in ranks)
    assert ranks[0]["sample_sum"] != ranks[1]["sample_sum"]  # each rank draws its own samples
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # gradients were all-reduced: same weights
    assert ranks[0]["reward_means"] == ranks[1]["reward_means"]  # metrics are over the gathered batch
