"""Where a training call's memory goes: bytes autograd keeps for the backward pass, by operation.

    python bench/activations.py                    # embedded UNet, 16 / 64 / 128 / 320 rows, both attentions
    python bench/activations.py --rows 128 --attention classic

A training micro-batch of M (sample, step) pairs is one UNet call of 2M rows (the two guidance branches).
Everything the forward pass saves for the backward pass stays alive until the backward pass reaches it, so
this is the part of the peak memory that grows with the micro-batch. The figures come from walking the
autograd graph of one forward pass and adding up each saved tensor's storage once.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _setup import build_bench_pipeline, embedded_weights_folder  # noqa: E402


def load_unet(attention: str) -> torch.nn.Module:
    """The shipped embedded UNet (its architecture with random weights when the weights are absent)."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    folder = embedded_weights_folder()
    unet = (
        UNet2DConditionModel.from_pretrained(folder, subfolder="unet") if folder else build_bench_pipeline().unet
    )
    unet.set_attn_processor(AttnProcessor() if attention == "classic" else AttnProcessor2_0())
    return unet


def saved_bytes_by_op(unet: torch.nn.Module, rows: int) -> collections.Counter:
    """Bytes of the tensors the backward pass of one ``rows``-row forward keeps, per autograd node type."""
    from loopdiff.embedded.pipeline import MAX_PROMPT_TOKENS

    config = unet.config
    size = config.sample_size
    x = torch.randn(rows, config.in_channels, size, size)
    t = torch.randint(0, 1000, (rows,))
    context = torch.randn(rows, MAX_PROMPT_TOKENS, config.cross_attention_dim)
    out = unet(x, t, context).sample
    by_op: collections.Counter = collections.Counter()
    storages: set[int] = set()
    nodes, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in nodes:
            continue
        nodes.add(node)
        for name in dir(node):
            if not name.startswith("_saved_"):
                continue
            try:
                value = getattr(node, name)
            except RuntimeError:  # a saved value already freed or not a tensor
                continue
            for tensor in value if isinstance(value, (tuple, list)) else [value]:
                if isinstance(tensor, torch.Tensor) and tensor.numel():
                    key = tensor.untyped_storage().data_ptr()
                    if key not in storages:
                        storages.add(key)
                        by_op[type(node).__name__.removesuffix("Backward0")] += tensor.untyped_storage().nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return by_op


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 64, 128, 320])
    parser.add_argument("--attention", choices=["classic", "sdpa", "both"], default="both")
    parser.add_argument("--top", type=int, default=8, help="operations listed per row count")
    args = parser.parse_args()
    torch.set_num_threads(1)
    attentions = ["classic", "sdpa"] if args.attention == "both" else [args.attention]
    mb = 2**20
    for attention in attentions:
        unet = load_unet(attention)
        print(f"\n{attention} attention: MB kept for the backward pass")
        print("| rows (= 2 x micro-batch) | total | MB per row | largest: op MB |")
        print("|---|---|---|---|")
        for rows in args.rows:
            by_op = saved_bytes_by_op(unet, rows)
            total = sum(by_op.values())
            top = ", ".join(f"{op} {b / mb:.0f}" for op, b in by_op.most_common(args.top))
            print(f"| {rows} | {total / mb:.0f} | {total / mb / rows:.2f} | {top} |")


if __name__ == "__main__":
    main()
