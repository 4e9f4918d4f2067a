"""bench/gpu.py's Markdown: the families' figures, the checks, TRL's ratio, and the memory estimates."""

from __future__ import annotations

from typing import Any

from _gpu_memory import GIB


def _count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def memory_table(rows: list[dict[str, Any]]) -> str:
    """Expected GiB per config: each term of ``_gpu_memory.estimate_memory`` and the total."""
    terms = ("weights", "gradients", "optimizer", "ema", "trajectories", "activations")
    lines = ["| config | denoiser params | trained | " + " | ".join(terms) + " | total GiB |",
             "|---" * (len(terms) + 4) + "|"]
    for r in rows:
        p, b = r["params"], r["bytes"]
        lines.append(f"| {r.get('config', r['family'])} | {_count(p['denoiser'])} | {_count(p['trainable'])} | "
                     + " | ".join(f"{b[t] / GIB:.2f}" for t in terms) + f" | {r['total_gib']:.1f} |")
    return "\n".join(lines)


def _family_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| family | params | trained | px | steps | samples | img/s sampling | s / trained sample | s / epoch "
             "| overhead in-epoch | overhead replay | peak MB | estimated MB |", "|---" * 13 + "|"]
    for r in rows:
        estimate = f"{r['estimate']['total_bytes'] / 2**20:.0f}"
        if "skipped" in r:
            lines.append(f"| {r['family']} | skipped: {r['skipped']} |" + " |" * 10 + f" {estimate} |")
            continue
        s, o = r["setting"], r["overhead"]
        lines.append(
            f"| {r['family']} | {_count(r['unet_params'])} | {_count(r['trainable_params'])} | {s['resolution']} | "
            f"{s['steps']} | {s['samples']} | {r['sampling_images_per_second']:.3g} | "
            f"{r['seconds_per_trained_sample']:.3g} | {r['seconds']['epoch']:.3g} | {o['in_epoch_wall']:.3f} | "
            f"{o['replay_wall']:.3f} | {r['peak_memory_mb']:.0f} | {estimate} |")
    return lines


def _check_lines(checks: dict[str, Any]) -> list[str]:
    lines = []
    for name, c in checks.items():
        if "skipped" in c:
            lines.append(f"- {name}: skipped ({c['skipped']})")
        elif "log_prob_max_abs_diff" in c:
            lines.append(f"- {name} on {c['device']} ({c['precision']}): {'passed' if c['passed'] else 'FAILED'}; "
                         f"max |d log p| {c['log_prob_max_abs_diff']:.2e} (tolerance {c['log_prob_atol']:.0e}) over "
                         f"{c['log_probs']} log-probabilities, weight update rel. diff {c['update_rel_diff']:.2e} "
                         f"({c['update_rtol']:.0e})")
        else:
            lines.append(f"- {name} on {c['device']} ({c['precision']}): {'passed' if c['passed'] else 'FAILED'}; "
                         f"finite {c['finite']}, loss {c['loss']:.3e}")
    return lines


def markdown_report(result: dict[str, Any]) -> str:
    """The whole run in Markdown: whatever parts it reached."""
    gpu = result.get("gpu") or result.get("device", "?")
    lines = [f"# loopdiff on {gpu}", "",
             f"torch {result.get('torch')}, mixed precision {result.get('mixed_precision')}, widths / "
             f"{result.get('scale')}{' (tiny)' if result.get('tiny') else ''}, budget {result.get('budget_s')} s", ""]
    if "checks" in result:
        lines += ["## Checks", "", *_check_lines(result["checks"]), ""]
    if "families" in result:
        lines += ["## Families", "", *_family_table(result["families"]), ""]
    if "trl" in result:
        trl = result["trl"]
        lines += ["## TRL DDPOTrainer (SD 2 shape)", "",
                  f"skipped: {trl['skipped']}" if "skipped" in trl else
                  f"TRL {trl['versions']['trl']}: {trl['seconds']['epoch']:.3g} s per epoch, "
                  f"{trl['ratio_trl_over_loopdiff']:.2f}x loopdiff's", ""]
    if "memory_estimates" in result:
        lines += ["## Expected memory", "", memory_table(result["memory_estimates"]), ""]
    return "\n".join(lines)
