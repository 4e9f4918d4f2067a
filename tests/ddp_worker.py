"""Run by tests/test_multiprocess.py under torchrun: two CPU processes training one model with gloo (and an EMA)."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from trainer_helpers import make_trainer  # noqa: E402

torch.set_num_threads(1)
out = Path(sys.argv[1])
trainer = make_trainer(out, "loop", training={"epochs": 2, "samples_per_epoch": 16, "ema_decay": 0.9})
history = trainer.train()
checksum = float(sum(p.double().sum() for p in trainer.unet.parameters()))
ema_checksum = float(sum(t.double().sum() for t in trainer.ema.average.values()))
rank = trainer.accelerator.process_index
first_latents = trainer.loop.collect(5)[0]
(out / f"rank{rank}.json").write_text(json.dumps({
    "processes": trainer.accelerator.num_processes,
    "checksum": checksum,
    "ema_checksum": ema_checksum,
    "sample_sum": float(first_latents.latents[:, -1].sum()),
    "reward_means": [h["reward/mean"] for h in history],
}))
