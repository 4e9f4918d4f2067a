"""Train the embedded world's reward scorers from scratch on augmented renders.

    python -m loopdiff.embedded.train_scorers                      # all four, into assets/scorers/
    python -m loopdiff.embedded.train_scorers --only vqa --out /tmp/scorers --threads 1

Every batch is freshly rendered (random scenes of 1-4 objects) and degraded like a generated image:
colour gain and offset, Gaussian blur, down-and-up sampling and pixel noise. Each run checkpoints to
``{out}/{name}.ckpt.pt`` and resumes from it; the final weights and a json config (architecture,
vocabulary, training settings, held-out metrics) replace the checkpoint.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from loopdiff.embedded.prompts import (
    ObjectSpec,
    WorldPrompt,
    parse_prompt,
    place_objects,
    prompt_text,
    random_caption_and_scene,
)
from loopdiff.embedded.scorers import (
    DEFAULT_VOCAB,
    GRID,
    AestheticScorer,
    ContrastiveAligner,
    GridDetector,
    PhraseVQA,
    build_scorer,
    encode_texts,
    save_scorer,
    scorer_dir,
)
from loopdiff.embedded.aesthetic import colorfulness_score
from loopdiff.embedded.world import COLORS, IMAGE_SIZE, MAX_SIZE, MIN_SIZE, SHAPES, TEXTURES, Scene, WorldObject, render

_COLOR_NAMES = tuple(COLORS)
_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above", "next to": "left"}


# ----------------------------------------------------------------------------- data


def random_scene(rng: np.random.Generator) -> Scene:
    """1-4 objects with uniformly random attributes at random non-overlapping places."""
    n = int(rng.choice([1, 2, 3, 4], p=[0.2, 0.35, 0.25, 0.2]))
    attributes = [
        (SHAPES[rng.integers(len(SHAPES))], _COLOR_NAMES[rng.integers(len(COLORS))], TEXTURES[rng.integers(len(TEXTURES))])
        for _ in range(n)
    ]
    return place_objects(rng, attributes)


def to_tensor(scenes: list[Scene]) -> torch.Tensor:
    """Rendered scenes as float ``(N, 3, 64, 64)`` in [0, 1]."""
    return torch.from_numpy(np.stack([render(s) for s in scenes])).permute(0, 3, 1, 2).float() / 255.0


def _gaussian_blur(images: torch.Tensor, sigmas: torch.Tensor, radius: int = 3) -> torch.Tensor:
    """Blur each image with its own sigma (pixels): separable, per-sample kernels."""
    n, c, h, w = images.shape
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    taps = torch.exp(-0.5 * (offsets[None] / sigmas.clamp(min=1e-3)[:, None]) ** 2)
    taps = (taps / taps.sum(1, keepdim=True)).repeat_interleave(c, dim=0)  # (n*c, k)
    x = F.pad(images.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, taps.view(n * c, 1, 1, -1), groups=n * c)
    x = F.conv2d(x, taps.view(n * c, 1, -1, 1), groups=n * c)
    return x.view(n, c, h, w)


def augment(images: torch.Tensor, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Degrade renders like imperfect generations: colour jitter, blur, resampling, noise."""
    n = images.shape[0]

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator)

    gain = (1 + strength * 0.15 * (2 * uniform(n, 1, 1, 1) - 1)) * (1 + strength * 0.06 * (2 * uniform(n, 3, 1, 1) - 1))
    offset = strength * 0.04 * (2 * uniform(n, 3, 1, 1) - 1)
    x = images * gain + offset
    x = _gaussian_blur(x, strength * 1.3 * uniform(n))
    resample = uniform(n) < 0.3 * strength
    if resample.any():
        small = F.interpolate(x[resample], scale_factor=0.5, mode="area")
        x[resample] = F.interpolate(small, size=images.shape[-2:], mode="bilinear", align_corners=False)
    x = x + strength * 0.06 * uniform(n, 1, 1, 1) * torch.randn(x.shape, generator=generator)
    return x.clamp(0, 1)


class VaeRoundTrip:
    """Renders as the world's VAE returns them, from slightly perturbed latents: the blur, lumpy edges and
    colour bleed of generated images, with the rendered scene still the ground truth."""

    def __init__(self, vae_folder: str | Path, max_latent_noise: float = 0.3):
        from diffusers import AutoencoderKL  # only the round trip needs diffusers here

        self.vae = AutoencoderKL.from_pretrained(vae_folder, local_files_only=True).eval().requires_grad_(False)
        self.max_latent_noise = max_latent_noise

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``images`` in [0, 1] through encoder and decoder, each with latent noise of a random share (up to
        ``max_latent_noise``) of the latents' standard deviation."""
        latents = self.vae.encode(images * 2 - 1).latent_dist.mean
        share = self.max_latent_noise * torch.rand(len(images), 1, 1, 1, generator=generator)
        latents = latents + share * latents.std() * torch.randn(latents.shape, generator=generator)
        return ((self.vae.decode(latents).sample + 1) / 2).clamp(0, 1)


def degrade_like_generations(images: torch.Tensor, generator: torch.Generator, round_trip: VaeRoundTrip | None,
                             fraction: float) -> torch.Tensor:
    """:func:`augment` every image; first send a ``fraction`` of them through ``round_trip`` (when given)."""
    if round_trip is not None and fraction > 0:
        chosen = torch.rand(len(images), generator=generator) < fraction
        if chosen.any():
            images = images.clone()
            images[chosen] = round_trip(images[chosen], generator)
    return augment(images, generator)


def _describe(rng: np.random.Generator, shape: str, color: str, texture: str) -> ObjectSpec:
    """A spec naming the shape and, at random, the colour and the texture."""
    return ObjectSpec(shape, color if rng.random() < 0.7 else None, texture if rng.random() < 0.5 else None)


def positive_phrase(rng: np.random.Generator, scene: Scene) -> str:
    """A noun phrase true of some object of ``scene``."""
    obj = scene.objects[rng.integers(len(scene.objects))]
    return _describe(rng, obj.shape, obj.color, obj.texture).phrase()


def negative_phrase(rng: np.random.Generator, scene: Scene) -> str:
    """A noun phrase true of no object of ``scene`` (wrong attribute, or attributes of two objects)."""
    objects = scene.objects
    for _ in range(50):
        a = objects[rng.integers(len(objects))]
        if len(objects) >= 2 and rng.random() < 0.35:  # binding: shape of one, colour/texture of another
            b = objects[rng.integers(len(objects))]
            spec = ObjectSpec(a.shape, b.color, b.texture if rng.random() < 0.3 else None)
        else:
            spec = _describe(rng, a.shape, a.color, a.texture)
            named = ["shape"] + [k for k in ("color", "texture") if getattr(spec, k) is not None]
            key = named[rng.integers(len(named))]
            values = {"shape": SHAPES, "color": _COLOR_NAMES, "texture": TEXTURES}[key]
            others = [v for v in values if v != getattr(spec, key)]
            spec = replace(spec, **{key: others[rng.integers(len(others))]})
        if not any(spec.matches(o) for o in objects):
            return spec.phrase()
    absent = [s for s in SHAPES if all(o.shape != s for o in objects)]  # at most 4 of 8 shapes are present
    return ObjectSpec(absent[rng.integers(len(absent))]).phrase()


def vqa_batch(rng: np.random.Generator, n_images: int, per_image: int = 4) -> tuple[list[Scene], list[str], list[int], list[int]]:
    """Scenes, phrases, the image index of each phrase and its answer (0 = yes, 1 = no); half are yes."""
    scenes = [random_scene(rng) for _ in range(n_images)]
    phrases, index, answers = [], [], []
    for i, scene in enumerate(scenes):
        for k in range(per_image):
            yes = k % 2 == 0
            phrases.append(positive_phrase(rng, scene) if yes else negative_phrase(rng, scene))
            index.append(i)
            answers.append(0 if yes else 1)
    return scenes, phrases, index, answers


def detector_targets(scenes: list[Scene], sigma: float = 0.8) -> dict[str, torch.Tensor]:
    """CenterNet targets on the grid: Gaussian heat, and per-object cell, attributes, size, offset."""
    cell = IMAGE_SIZE / GRID
    heat = np.zeros((len(scenes), GRID, GRID), dtype=np.float32)
    gy, gx = np.mgrid[0:GRID, 0:GRID]
    rows = []
    for n, scene in enumerate(scenes):
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            cx, cy = (x0 + x1) / 2 / cell, (y0 + y1) / 2 / cell
            ix, iy = min(int(cx), GRID - 1), min(int(cy), GRID - 1)
            bump = np.exp(-((gx - ix) ** 2 + (gy - iy) ** 2) / (2 * sigma**2))
            heat[n] = np.maximum(heat[n], bump)
            rows.append((n, iy, ix, _COLOR_NAMES.index(obj.color), SHAPES.index(obj.shape),
                         TEXTURES.index(obj.texture), obj.size / 32, cx - ix, cy - iy))
    table = np.array(rows, dtype=np.float64)
    as_long = lambda j: torch.tensor(table[:, j], dtype=torch.long)  # noqa: E731
    return {
        "heat": torch.from_numpy(heat), "n": as_long(0), "y": as_long(1), "x": as_long(2),
        "color": as_long(3), "shape": as_long(4), "texture": as_long(5),
        "size": torch.tensor(table[:, 6], dtype=torch.float32),
        "offset": torch.tensor(table[:, 7:9], dtype=torch.float32),
    }


def perturb_prompt(prompt: WorldPrompt, rng: np.random.Generator) -> str | None:
    """A caption that the prompt's scene does not satisfy, close to the prompt (or None)."""
    specs = list(prompt.objects)
    numeral = prompt.category == "numeracy"
    choices = ["attribute"]
    if len(specs) >= 2:
        choices.append("swap")
    if prompt.relation is not None and prompt.relation != "next to":
        choices.append("relation")
    if numeral:
        choices.append("count")
    choice = choices[rng.integers(len(choices))]
    if choice == "relation":
        return prompt_text(specs, _OPPOSITE[prompt.relation], numeral)
    if choice == "count":
        i = rng.integers(len(specs))
        counts = [c for c in range(1, 5) if c != specs[i].count]
        specs[i] = replace(specs[i], count=int(counts[rng.integers(len(counts))]))
        return prompt_text(specs, prompt.relation, numeral)
    if choice == "swap":
        a, b = specs[0], specs[-1]
        if (a.color, a.texture) == (b.color, b.texture):
            return None
        specs[0], specs[-1] = replace(a, color=b.color, texture=b.texture), replace(b, color=a.color, texture=a.texture)
        return prompt_text(specs, prompt.relation, numeral)
    i = rng.integers(len(specs))
    spec = specs[i]
    key = ["shape", "color", "texture"][rng.integers(3)]
    values = {"shape": SHAPES, "color": _COLOR_NAMES, "texture": TEXTURES}[key]
    current = getattr(spec, key)
    if current is None:
        return None
    specs[i] = replace(spec, **{key: [v for v in values if v != current][rng.integers(len(values) - 1)]})
    return prompt_text(specs, prompt.relation, numeral)


# ----------------------------------------------------------------------------- losses


def focal_heat_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss, normalised by the number of object centres."""
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    positive = target >= 0.999
    pos_loss = -((1 - p) ** 2 * torch.log(p))[positive].sum()
    neg_loss = -((1 - target) ** 4 * p**2 * torch.log(1 - p))[~positive].sum()
    return (pos_loss + neg_loss) / positive.sum().clamp(min=1)


def grid_attribute_loss(maps: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Focal objectness loss plus attribute cross-entropies at the object-centre cells."""
    n, y, x = targets["n"], targets["y"], targets["x"]
    loss = focal_heat_loss(maps["heat"], targets["heat"])
    for key in ("color", "shape", "texture"):
        loss = loss + F.cross_entropy(maps[key][n, :, y, x], targets[key])
    return loss


def detector_loss(maps: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    n, y, x = targets["n"], targets["y"], targets["x"]
    loss = grid_attribute_loss(maps, targets)
    loss = loss + F.l1_loss(maps["size"][n, y, x], targets["size"]) * 4
    loss = loss + F.l1_loss(maps["offset"][n, :, y, x], targets["offset"])
    return loss


def contrastive_loss(model: ContrastiveAligner, images: torch.Tensor, captions: list[str], negatives: list[str],
                     vocab: list[str]) -> torch.Tensor:
    """Symmetric InfoNCE with soft targets for repeated captions; hard negative captions for image->text."""
    image_emb = model.encode_images(images)
    text_emb = model.encode_texts(encode_texts(captions + negatives, vocab))
    scale = model.logit_scale.exp().clamp(max=100)
    logits = scale * image_emb @ text_emb.T  # (B, B + negatives)
    same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
    target = same / same.sum(1, keepdim=True)
    image_to_text = torch.sum(-F.pad(target, (0, len(negatives))) * logits.log_softmax(dim=1), dim=1).mean()
    text_to_image = torch.sum(-target * logits[:, : len(captions)].T.log_softmax(dim=1), dim=1).mean()
    return (image_to_text + text_to_image) / 2


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_vqa(model: PhraseVQA, vocab: list[str], n_images: int = 400, seed: int = 10_000,
                 degrade: bool = False, round_trip: VaeRoundTrip | None = None) -> float:
    """Yes/no accuracy on fresh scenes: half the phrases true, half false (wrong attribute or binding); the
    images degraded (``degrade``) or sent through a VAE (``round_trip``) when asked."""
    rng = np.random.default_rng(seed)
    scenes, phrases, index, answers = vqa_batch(rng, n_images)
    images = to_tensor(scenes)
    if round_trip is not None:
        images = round_trip(images, torch.Generator().manual_seed(seed))
    if degrade:
        images = augment(images, torch.Generator().manual_seed(seed))
    logits = model(images, encode_texts(phrases, vocab), torch.tensor(index))
    return float((logits.argmax(1) == torch.tensor(answers)).float().mean())


@torch.no_grad()
def evaluate_detector(model: GridDetector, n_images: int = 400, seed: int = 20_000, degrade: bool = False) -> dict[str, float]:
    """Exact-count accuracy per image and attribute accuracy of objects found within 3 px of their centre."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(n_images)]
    images = to_tensor(scenes)
    if degrade:
        images = augment(images, torch.Generator().manual_seed(seed))
    detections = model.detect(images)
    hits = {"found": 0, "color": 0, "shape": 0, "texture": 0}
    total = 0
    for scene, found in zip(scenes, detections):
        for obj in scene.objects:
            total += 1
            x0, y0, x1, y1 = obj.box
            near = [d for d in found if max(abs((d.box[0] + d.box[2] - x0 - x1) / 2), abs((d.box[1] + d.box[3] - y0 - y1) / 2)) <= 3]
            if near:
                hits["found"] += 1
                for key in ("color", "shape", "texture"):
                    hits[key] += getattr(near[0], key) == getattr(obj, key)
    metrics = {k: v / total for k, v in hits.items()}
    metrics["count"] = float(np.mean([len(f) == len(s.objects) for s, f in zip(scenes, detections)]))
    return metrics


@torch.no_grad()
def evaluate_aligner(model: ContrastiveAligner, vocab: list[str], n_images: int = 400, seed: int = 30_000) -> dict[str, float]:
    """Top-1 caption retrieval in groups of 32, and how often the true caption beats a perturbed one."""
    rng = np.random.default_rng(seed)
    pairs = [random_caption_and_scene(rng, single_object_prob=0.0) for _ in range(n_images)]
    captions = [c for c, _ in pairs]
    perturbed = [perturb_prompt(parse_prompt(c), rng) for c in captions]
    image_emb = model.encode_images(to_tensor([s for _, s in pairs]))
    text_emb = model.encode_texts(encode_texts(captions, vocab))
    keep = [i for i, p in enumerate(perturbed) if p is not None]
    wrong_emb = model.encode_texts(encode_texts([perturbed[i] for i in keep], vocab))
    right = (image_emb[keep] * text_emb[keep]).sum(1)
    wrong = (image_emb[keep] * wrong_emb).sum(1)
    top1 = []
    for start in range(0, n_images - 31, 32):
        sims = image_emb[start : start + 32] @ text_emb[start : start + 32].T
        top1 += (sims.argmax(1) == torch.arange(32)).tolist()
    return {"top1_of_32": float(np.mean(top1)), "true_beats_perturbed": float((right > wrong).float().mean())}


# ----------------------------------------------------------------------------- training loop


def _train(name: str, config: dict, steps: int, lr: float, out: Path, step_loss: Callable, log_every: int = 50,
           checkpoint_every: int = 200) -> torch.nn.Module:
    """AdamW with cosine decay, from initial weights seeded by the config's seed; resumes from
    ``{out}/{name}.ckpt.pt``."""
    torch.manual_seed(config["training"]["seed"])
    model = build_scorer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    checkpoint = out / f"{name}.ckpt.pt"
    start = 0
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start = state["step"]
        print(f"[{name}] resumed at step {start}", flush=True)
    model.train()
    began, running = time.time(), 0.0
    for step in range(start, steps):
        loss = step_loss(model, np.random.default_rng([config["training"]["seed"], step]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        running += loss.item()
        if (step + 1) % log_every == 0:
            print(f"[{name}] step {step + 1}/{steps} loss {running / log_every:.4f} {time.time() - began:.0f}s", flush=True)
            running = 0.0
        if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(), "step": step + 1}, checkpoint)
    config["training"]["seconds_this_run"] = round(time.time() - began, 1)
    return model.eval()


def train_vqa(out: Path, steps: int = 1500, batch: int = 48, seed: int = 0, lr: float = 2e-3, aux_weight: float = 1.0,
              vae: str | Path | None = None, round_trip_fraction: float = 0.5) -> dict:
    """The phrase VQA scorer; with ``vae`` (a VAE folder) a ``round_trip_fraction`` of each batch is seen as
    that VAE reconstructs it (:class:`VaeRoundTrip`), so that the scorer reads generated images as it reads
    renders."""
    vocab = list(DEFAULT_VOCAB)
    round_trip = VaeRoundTrip(vae) if vae is not None else None
    fraction = round_trip_fraction if round_trip is not None else 0.0
    config = {"kind": "vqa", "arguments": {"vocab_size": len(vocab), "width": 48, "vocab": vocab}, "vocab": vocab,
              "training": {"steps": steps, "batch_images": batch, "phrases_per_image": 4, "lr": lr, "seed": seed,
                           "auxiliary_weight": aux_weight, "vae_round_trip_fraction": fraction,
                           "max_latent_noise": round_trip.max_latent_noise if round_trip else None}}

    def step_loss(model: PhraseVQA, rng: np.random.Generator) -> torch.Tensor:
        scenes, phrases, index, answers = vqa_batch(rng, batch)
        generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
        images = degrade_like_generations(to_tensor(scenes), generator, round_trip, fraction)
        maps = model.maps(images)
        logits = model.answer(maps, encode_texts(phrases, vocab), torch.tensor(index))
        return F.cross_entropy(logits, torch.tensor(answers)) + aux_weight * grid_attribute_loss(maps, detector_targets(scenes))

    model = _train("vqa", config, steps, lr, out, step_loss)
    config["metrics"] = {"yes_no_accuracy_clean": evaluate_vqa(model, vocab),
                         "yes_no_accuracy_degraded": evaluate_vqa(model, vocab, degrade=True)}
    if round_trip is not None:
        config["metrics"]["yes_no_accuracy_round_trip"] = evaluate_vqa(model, vocab, round_trip=round_trip)
    return _finish("vqa", model, config, out)


def train_detector(out: Path, steps: int = 1500, batch: int = 48, seed: int = 1, lr: float = 2e-3) -> dict:
    config = {"kind": "detector", "arguments": {"width": 48, "colors": list(COLORS), "shapes": list(SHAPES),
                                                  "textures": list(TEXTURES)},
              "training": {"steps": steps, "batch_images": batch, "lr": lr, "seed": seed}}

    def step_loss(model: GridDetector, rng: np.random.Generator) -> torch.Tensor:
        scenes = [random_scene(rng) for _ in range(batch)]
        images = augment(to_tensor(scenes), torch.Generator().manual_seed(int(rng.integers(2**31))))
        return detector_loss(model(images), detector_targets(scenes))

    model = _train("detector", config, steps, lr, out, step_loss)
    config["metrics"] = {"clean": evaluate_detector(model), "degraded": evaluate_detector(model, degrade=True)}
    return _finish("detector", model, config, out)


def train_aligner(out: Path, steps: int = 1500, batch: int = 64, seed: int = 2, lr: float = 2e-3) -> dict:
    vocab = list(DEFAULT_VOCAB)
    config = {"kind": "aligner", "arguments": {"vocab_size": len(vocab), "width": 48, "dim": 64}, "vocab": vocab,
              "training": {"steps": steps, "batch_images": batch, "lr": lr, "seed": seed}}

    def step_loss(model: ContrastiveAligner, rng: np.random.Generator) -> torch.Tensor:
        pairs = [random_caption_and_scene(rng, single_object_prob=0.15) for _ in range(batch)]
        captions = [c for c, _ in pairs]
        negatives = [p for p in (perturb_prompt(parse_prompt(c), rng) for c in captions) if p is not None]
        images = augment(to_tensor([s for _, s in pairs]), torch.Generator().manual_seed(int(rng.integers(2**31))))
        return contrastive_loss(model, images, captions, negatives, vocab)

    model = _train("aligner", config, steps, lr, out, step_loss)
    config["metrics"] = evaluate_aligner(model, vocab)
    return _finish("aligner", model, config, out)


# ----------------------------------------------------------------------------- aesthetic preferences

PREFERENCE_TEMPERATURE = 0.05  # Bradley-Terry noise of the simulated raters, in colourfulness / 100
AGREEMENT_MARGIN = 0.05  # pairs whose evaluator scores differ by less count as ties and are not judged


def aesthetic_scene(rng: np.random.Generator) -> Scene:
    """0-4 objects of any attributes and of sizes 10-40 anywhere in the frame (overlaps allowed).

    Wider than the prompts' scenes (sizes 20-30, apart), so that the scorer has seen the larger and
    plainer images RL will move towards.
    """
    objects = []
    for _ in range(int(rng.integers(0, 5))):
        size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
        lo, hi = size // 2, IMAGE_SIZE - size + size // 2
        objects.append(WorldObject(
            SHAPES[rng.integers(len(SHAPES))], _COLOR_NAMES[rng.integers(len(COLORS))],
            TEXTURES[rng.integers(len(TEXTURES))], size, int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1)),
        ))
    return Scene(tuple(objects))


def base_model_images(
    n: int, seed: int, split: str, steps: int = 10, batch: int = 64, model: str | Path | None = None
) -> torch.Tensor:
    """``n`` images for the world's color prompts of ``split`` (DDIM, eta 1, guidance 5).

    ``model`` is a pipeline folder (a fine-tuned export); by default the shipped base model.
    """
    from loopdiff.embedded.pipeline import load_embedded_pipeline  # the pipeline is only needed here
    from loopdiff.embedded.prompts import load_prompts

    pipe = load_embedded_pipeline(device="cpu", dtype=torch.float32, path=model)
    prompts = load_prompts("color", split)
    rng = np.random.default_rng(seed)
    chunks = []
    for start in range(0, n, batch):
        chosen = [prompts[i] for i in rng.integers(len(prompts), size=min(batch, n - start))]
        generator = torch.Generator().manual_seed(seed * 1_000_003 + start)
        out = pipe(chosen, num_inference_steps=steps, guidance_scale=5.0, eta=1.0, generator=generator, output_type="pt")
        chunks.append(out.images.float().clamp(0, 1))
    return torch.cat(chunks)


def preference_labels(scores: torch.Tensor, rng: np.random.Generator, temperature: float) -> torch.Tensor:
    """Sampled Bradley-Terry choices: 1 where the first of a pair ``scores[:, 0]`` is preferred."""
    p_first = torch.sigmoid((scores[:, 0] - scores[:, 1]) / temperature)
    return (torch.from_numpy(rng.random(len(p_first))).float() < p_first).float()


def pairwise_agreement(predicted: torch.Tensor, target: torch.Tensor, margin: float = AGREEMENT_MARGIN) -> float:
    """Fraction of pairs, among those whose ``target`` differs by at least ``margin``, ordered alike."""
    i, j = torch.triu_indices(len(target), len(target), offset=1)
    decided = (target[i] - target[j]).abs() >= margin
    same = torch.sign(predicted[i] - predicted[j]) == torch.sign(target[i] - target[j])
    return float(same[decided].float().mean())


@torch.no_grad()
def _logits(model: AestheticScorer, images: torch.Tensor) -> torch.Tensor:
    """The scorer's logits for ``images``, 128 at a time."""
    return torch.cat([model(chunk) for chunk in images.split(128)])


def _calibrate(logits: torch.Tensor, scores: torch.Tensor) -> dict[str, float]:
    """Least-squares ``scale, shift`` mapping the scorer's ``logits`` onto the evaluator's ``scores``."""
    logits = logits.double()
    design = torch.stack([logits, torch.ones_like(logits)], dim=1)
    scale, shift = torch.linalg.lstsq(design, scores.double()[:, None]).solution[:, 0].tolist()
    return {"scale": scale, "shift": shift}


def train_aesthetic(out: Path, steps: int = 1500, batch: int = 64, seed: int = 3, lr: float = 2e-3,
                    generated: int = 2048, held_out: int = 512) -> dict:
    """A preference scorer from simulated raters' choices between pairs of images.

    Half of each batch is augmented renders of :func:`aesthetic_scene`, half the base model's own
    images (``generated`` of them, drawn once and cached in ``out``); the raters prefer the more
    colourful image of a pair with Bradley-Terry noise. The scorer is then calibrated on ``held_out``
    fresh base images of the training prompts and judged on as many of the validation prompts, which
    nothing here is fit on.
    """
    config = {"kind": "aesthetic", "arguments": {"width": 32, "hidden": 64},
              "training": {"steps": steps, "batch_images": batch, "lr": lr, "seed": seed, "generated_images": generated,
                           "temperature": PREFERENCE_TEMPERATURE}}
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "aesthetic.samples.pt"
    if cache.is_file():
        pool = torch.load(cache, weights_only=True)
    else:
        print(f"[aesthetic] sampling {generated} base-model images", flush=True)
        pool = base_model_images(generated, seed, "train")
        torch.save(pool, cache)
    pool_scores = colorfulness_score(pool)

    def step_loss(model: AestheticScorer, rng: np.random.Generator) -> torch.Tensor:
        renders = to_tensor([aesthetic_scene(rng) for _ in range(batch // 2)])
        renders = augment(renders, torch.Generator().manual_seed(int(rng.integers(2**31))))
        index = torch.from_numpy(rng.integers(len(pool), size=batch - batch // 2))
        images = torch.cat([renders, pool[index]])
        scores = torch.cat([colorfulness_score(renders), pool_scores[index]])
        order = torch.from_numpy(rng.permutation(batch)).view(-1, 2)
        labels = preference_labels(scores[order], rng, PREFERENCE_TEMPERATURE)
        logits = model(images)[order]
        return F.binary_cross_entropy_with_logits(logits[:, 0] - logits[:, 1], labels)

    model = _train("aesthetic", config, steps, lr, out, step_loss)
    fit = base_model_images(held_out, seed + 1, "train")
    config["calibration"] = _calibrate(_logits(model, fit), colorfulness_score(fit))
    judged = base_model_images(held_out, seed + 2, "val")
    judged_scores, predicted = colorfulness_score(judged), _logits(model, judged)
    renders = to_tensor([aesthetic_scene(np.random.default_rng([seed, 10**6, i])) for i in range(held_out)])
    config["metrics"] = {
        "pairwise_agreement_base_images": pairwise_agreement(predicted, judged_scores),
        "pairwise_agreement_renders": pairwise_agreement(_logits(model, renders), colorfulness_score(renders)),
        "agreement_margin": AGREEMENT_MARGIN,
    }
    cache.unlink(missing_ok=True)
    return _finish("aesthetic", model, config, out)


def _finish(name: str, model: torch.nn.Module, config: dict, out: Path) -> dict:
    save_scorer(model, config, out, name)
    (out / f"{name}.ckpt.pt").unlink(missing_ok=True)
    print(f"[{name}] metrics {config['metrics']}", flush=True)
    return config


def default_vae() -> Path:
    """The shipped pipeline's VAE folder."""
    from loopdiff.embedded.pipeline import embedded_pipeline_path

    return embedded_pipeline_path() / "vae"


TRAINERS = {"vqa": train_vqa, "detector": train_detector, "aligner": train_aligner, "aesthetic": train_aesthetic}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=scorer_dir(), help="output folder (default: the shipped assets)")
    parser.add_argument("--only", default="vqa,detector,aligner,aesthetic", help="comma-separated subset of vqa,detector,aligner,aesthetic")
    parser.add_argument("--steps", type=int, default=None, help="training steps of each scorer (default per scorer)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vae", type=Path, default=None,
                        help="VAE folder whose round trips the VQA scorer also trains on (default: the shipped "
                             "pipeline's vae/; 'none' trains on renders only)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in TRAINERS]
    if unknown:
        parser.error(f"unknown scorer(s) {unknown}; expected a subset of {list(TRAINERS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        kwargs = {} if args.steps is None else {"steps": args.steps}
        if name == "vqa":
            kwargs["vae"] = default_vae() if args.vae is None else None if str(args.vae) == "none" else args.vae
        TRAINERS[name](args.out, **kwargs)


if __name__ == "__main__":
    main()
