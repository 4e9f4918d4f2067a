"""Small learned scorers of the embedded world, the stand-ins for T2I-CompBench's reward models.

- :class:`PhraseVQA` (for BLIP-VQA): (image, noun phrase) -> logits over {yes, no}; phrase words
  modulate (FiLM) a convolutional feature map that is max-pooled over positions.
- :class:`GridDetector` (for UniDet): a CenterNet-style detector on a 16 x 16 grid: objectness,
  colour, shape and texture logits, box size and centre offset per cell.
- :class:`ContrastiveAligner` (for CLIP): image and caption embeddings trained with InfoNCE.

All take images ``(N, 3, H, W)`` in [0, 1] of any size (resized to 64 x 64) on any device. Weights
ship in ``assets/scorers/{name}.safetensors`` with ``{name}.json`` (architecture, vocabulary, training
record); :mod:`loopdiff.embedded.train_scorers` reproduces them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from loopdiff.embedded.world import COLORS, IMAGE_SIZE, SHAPES, TEXTURES

GRID = 16  # detector cells per side (stride 4 at 64 x 64)
MAX_TOKENS = 24
_PLURAL = [s + ("es" if s.endswith(("s", "x")) else "s") for s in SHAPES]
DEFAULT_VOCAB = (
    "<pad> <unk> a an one two three four and on the of left right top bottom next to".split()
    + list(COLORS)
    + list(TEXTURES)
    + list(SHAPES)
    + _PLURAL
)
_WORD = re.compile(r"[a-z]+")


def scorer_dir() -> Path:
    """The folder of the shipped scorer weights."""
    return Path(str(resources.files("loopdiff.embedded") / "assets" / "scorers"))


def encode_texts(texts: Sequence[str], vocab: Sequence[str], max_tokens: int = MAX_TOKENS) -> torch.Tensor:
    """Word ids ``(N, L)`` (0 = padding, 1 = unknown word) of lower-cased ``texts``."""
    index = {word: i for i, word in enumerate(vocab)}
    rows = [[index.get(w, 1) for w in _WORD.findall(text.lower())][:max_tokens] or [1] for text in texts]
    length = max(len(r) for r in rows)
    return torch.tensor([r + [0] * (length - len(r)) for r in rows], dtype=torch.long)


def prepare_images(images: torch.Tensor, device: torch.device | str, size: int = IMAGE_SIZE) -> torch.Tensor:
    """``(N, 3, H, W)`` in [0, 1] -> float32 ``(N, 3, size, size)`` on ``device``."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got shape {tuple(images.shape)}")
    images = images.detach().to(device=device, dtype=torch.float32).clamp(0, 1)
    if images.shape[-2:] != (size, size):
        mode = "area" if images.shape[-1] > size else "bilinear"
        images = F.interpolate(images, size=(size, size), mode=mode)
    return images


def _block(cin: int, cout: int, stride: int = 1, dilation: int = 1, kernel: int = 3) -> nn.Sequential:
    padding = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, padding, dilation=dilation), nn.GroupNorm(8, cout), nn.SiLU()
    )


def coordinate_channels(images: torch.Tensor) -> torch.Tensor:
    """Append x and y coordinates in [-1, 1] as two channels."""
    n, _, h, w = images.shape
    ys = torch.linspace(-1, 1, h, device=images.device).view(1, 1, h, 1).expand(n, 1, h, w)
    xs = torch.linspace(-1, 1, w, device=images.device).view(1, 1, 1, w).expand(n, 1, h, w)
    return torch.cat([images, xs, ys], dim=1)


class Trunk(nn.Module):
    """64 x 64 images -> ``width`` x 16 x 16 features (receptive field about 37 pixels)."""

    def __init__(self, width: int = 48, coordinates: bool = False):
        super().__init__()
        self.coordinates = coordinates
        cin = 3 + 2 * coordinates
        self.layers = nn.Sequential(
            _block(cin, width // 2, stride=2, kernel=5),
            _block(width // 2, width),
            _block(width, width, stride=2),
            _block(width, width),
            _block(width, width, dilation=2),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images * 2 - 1
        if self.coordinates:
            x = coordinate_channels(x)
        return self.layers(x)


ATTRIBUTE_KINDS = ("color", "shape", "texture")


def attribute_table(vocab: Sequence[str]) -> torch.Tensor:
    """``(V, 2)`` long: for each word its attribute kind (0 none, 1 color, 2 shape, 3 texture) and value."""
    values = {"color": list(COLORS), "shape": list(SHAPES), "texture": list(TEXTURES)}
    table = torch.zeros(len(vocab), 2, dtype=torch.long)
    for i, word in enumerate(vocab):
        singular = word[:-2] if word.endswith("es") and word[:-2] in SHAPES else word.rstrip("s")
        for kind_index, kind in enumerate(ATTRIBUTE_KINDS, start=1):
            for candidate in (word, singular):
                if candidate in values[kind]:
                    table[i] = torch.tensor([kind_index, values[kind].index(candidate)])
    return table


class PhraseVQA(nn.Module):
    """``(image, phrase) -> (yes, no)`` logits from dense per-position attribute beliefs.

    The network predicts, at every cell of a 16 x 16 grid, an objectness logit and distributions over
    colour, shape and texture. A phrase's evidence at a cell is ``log p(object) + sum over its
    attribute words log p(word | cell)``; ``yes`` is the log-sum-exp of the evidence over cells (the
    log expected number of matching objects) and ``no`` a learned constant, so
    ``p(yes) = E / (E + exp(no))``. Words that name no attribute (articles, unknown nouns) add nothing.
    """

    def __init__(self, vocab_size: int, width: int = 48, vocab: Sequence[str] | None = None):
        super().__init__()
        vocab = list(vocab) if vocab is not None else list(DEFAULT_VOCAB)
        if len(vocab) != vocab_size:
            raise ValueError(f"vocab_size {vocab_size} does not match a vocabulary of {len(vocab)} words")
        self.trunk = Trunk(width)
        self.sizes = (1, len(COLORS), len(SHAPES), len(TEXTURES))
        self.head = nn.Sequential(_block(width, width), nn.Conv2d(width, sum(self.sizes), 1))
        self.no_logit = nn.Parameter(torch.tensor(0.0))
        self.register_buffer("attributes", attribute_table(vocab), persistent=False)

    def maps(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-cell logits: heat ``(N, G, G)``, color/shape/texture ``(N, K, G, G)``."""
        heat, color, shape, texture = self.head(self.trunk(images)).split(self.sizes, dim=1)
        return {"heat": heat[:, 0], "color": color, "shape": shape, "texture": texture}

    def answer(self, maps: dict[str, torch.Tensor], tokens: torch.Tensor, image_index: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, 2)`` = [yes, no] for phrase ``b`` asked of image ``image_index[b]`` (default ``b``)."""
        index = image_index if image_index is not None else torch.arange(tokens.shape[0], device=tokens.device)
        evidence = F.logsigmoid(maps["heat"][index])
        kinds, values = self.attributes[tokens].unbind(-1)  # (B, L)
        for kind_index, kind in enumerate(ATTRIBUTE_KINDS, start=1):
            named = kinds == kind_index
            counts = F.one_hot(torch.where(named, values, 0), maps[kind].shape[1]).mul(named.unsqueeze(-1)).sum(1)
            evidence = evidence + torch.einsum("bkhw,bk->bhw", maps[kind].log_softmax(dim=1)[index], counts.float())
        yes = evidence.flatten(1).logsumexp(dim=1)
        return torch.stack([yes, self.no_logit.expand_as(yes)], dim=1)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, image_index: torch.Tensor | None = None) -> torch.Tensor:
        return self.answer(self.maps(images), tokens, image_index)


@dataclass(frozen=True)
class GridDetection:
    """One detection: confidence, box ``(x0, y0, x1, y1)`` in 64-pixel coordinates, class probabilities."""

    score: float
    box: tuple[float, float, float, float]
    color: str
    shape: str
    texture: str
    probabilities: dict[str, float]  # probability of each predicted attribute value


class GridDetector(nn.Module):
    """CenterNet-style detector: per-cell objectness, attribute logits, size and centre offset."""

    def __init__(self, width: int = 48, colors: Sequence[str] = tuple(COLORS), shapes: Sequence[str] = SHAPES,
                 textures: Sequence[str] = TEXTURES):
        super().__init__()
        self.colors, self.shapes, self.textures = tuple(colors), tuple(shapes), tuple(textures)
        self.trunk = Trunk(width, coordinates=True)
        self.sizes = (1, len(self.colors), len(self.shapes), len(self.textures), 1, 2)
        self.head = nn.Sequential(_block(width, width), nn.Conv2d(width, sum(self.sizes), 1))
        with torch.no_grad():
            self.head[-1].bias[0].fill_(-2.2)  # objectness prior ~0.1

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Maps on the grid: heat ``(N, G, G)`` logits, color/shape/texture logits ``(N, K, G, G)``,
        size ``(N, G, G)`` (box side / 32) and offset ``(N, 2, G, G)`` (centre within the cell, in cells)."""
        out = self.head(self.trunk(images))
        heat, color, shape, texture, size, offset = out.split(self.sizes, dim=1)
        return {"heat": heat[:, 0], "color": color, "shape": shape, "texture": texture, "size": size[:, 0],
                "offset": offset}

    @torch.no_grad()
    def detect(self, images: torch.Tensor, threshold: float = 0.3) -> list[list[GridDetection]]:
        """Decoded detections (3 x 3 peak suppression, confidence above ``threshold``) per image."""
        maps = self.forward(images)
        heat = torch.sigmoid(maps["heat"])
        peaks = (heat == F.max_pool2d(heat[:, None], 3, 1, 1)[:, 0]) & (heat > threshold)
        cell = IMAGE_SIZE / heat.shape[-1]
        probs = {k: maps[k].softmax(dim=1) for k in ("color", "shape", "texture")}
        names = {"color": self.colors, "shape": self.shapes, "texture": self.textures}
        found: list[list[GridDetection]] = [[] for _ in range(images.shape[0])]
        for n, gy, gx in peaks.nonzero().tolist():
            cx = (gx + maps["offset"][n, 0, gy, gx].item()) * cell
            cy = (gy + maps["offset"][n, 1, gy, gx].item()) * cell
            side = max(maps["size"][n, gy, gx].item(), 0.1) * 32
            attributes, confidence = {}, {}
            for key in ("color", "shape", "texture"):
                p, i = probs[key][n, :, gy, gx].max(dim=0)
                attributes[key] = names[key][int(i)]
                confidence[key] = float(p)
            box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
            found[n].append(GridDetection(float(heat[n, gy, gx]), box, probabilities=confidence, **attributes))
        return found


class ContrastiveAligner(nn.Module):
    """CLIP-like dual encoder: unit-norm image and caption embeddings; cosine = alignment."""

    def __init__(self, vocab_size: int, width: int = 48, dim: int = 64, max_tokens: int = MAX_TOKENS):
        super().__init__()
        self.trunk = Trunk(width, coordinates=True)
        self.down = _block(width, 2 * width, stride=2)
        self.image_out = nn.Linear(4 * width, dim)
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.position = nn.Parameter(torch.zeros(max_tokens, dim))
        self.gru = nn.GRU(dim, dim, batch_first=True, bidirectional=True)
        self.text_out = nn.Linear(2 * dim, dim)
        self.logit_scale = nn.Parameter(torch.tensor(2.3))

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        x = self.down(self.trunk(images))
        pooled = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
        return F.normalize(self.image_out(pooled), dim=-1)

    def encode_texts(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        lengths = (tokens > 0).sum(1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, hidden = self.gru(packed)
        return F.normalize(self.text_out(torch.cat([hidden[0], hidden[1]], dim=1)), dim=-1)


class AestheticScorer(nn.Module):
    """Image -> one preference logit: the trunk's features, averaged over the image, through an MLP.

    Averaging per-pixel features lets it represent image-wide colour statistics (means and spreads),
    as the LAION aesthetic head reads a pooled CLIP embedding.
    """

    def __init__(self, width: int = 32, hidden: int = 64):
        super().__init__()
        self.trunk = Trunk(width)
        self.features = nn.Conv2d(width, hidden, 1)
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 3, 64, 64)`` in [0, 1] -> ``(N,)`` logits."""
        return self.head(self.features(self.trunk(images)).mean(dim=(2, 3))).squeeze(1)


# ----------------------------------------------------------------------------- files

_KINDS = {"vqa": PhraseVQA, "detector": GridDetector, "aligner": ContrastiveAligner, "aesthetic": AestheticScorer}


def build_scorer(config: dict[str, Any]) -> nn.Module:
    """An untrained scorer from its config (``kind`` and constructor ``arguments``)."""
    kind = config.get("kind")
    if kind not in _KINDS:
        raise ValueError(f"unknown scorer kind {kind!r}; expected one of {tuple(_KINDS)}")
    return _KINDS[kind](**config.get("arguments", {}))


def save_scorer(model: nn.Module, config: dict[str, Any], directory: str | Path, name: str) -> Path:
    """Write ``{name}.safetensors`` and ``{name}.json`` into ``directory``; returns the weights path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path = directory / f"{name}.safetensors"
    save_file(state, str(path))
    (directory / f"{name}.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def load_scorer(name: str, directory: str | Path | None = None, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load scorer ``name`` (``vqa``, ``detector``, ``aligner``, ``aesthetic``) in eval mode, with its config."""
    directory = Path(directory) if directory is not None else scorer_dir()
    weights, config_path = directory / f"{name}.safetensors", directory / f"{name}.json"
    if not weights.is_file() or not config_path.is_file():
        raise FileNotFoundError(
            f"scorer '{name}' needs {weights} and {config_path}; "
            "train them with `python -m loopdiff.embedded.train_scorers`"
        )
    config = json.loads(config_path.read_text())
    model = build_scorer(config)
    model.load_state_dict(load_file(str(weights)))
    return model.to(device).eval(), config


_LOADED: dict[tuple[str, str, str], tuple[nn.Module, dict[str, Any]]] = {}


def cached_scorer(name: str, directory: str | Path | None, device: torch.device | str) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`load_scorer`, once per (name, folder, device): every reward built from it shares the weights."""
    key = (name, str(directory or scorer_dir()), str(device))
    if key not in _LOADED:
        _LOADED[key] = load_scorer(name, directory, device)
    return _LOADED[key]


def missing_scorer_files(name: str) -> Callable[[Mapping[str, Any]], str | None]:
    """A reward check: which of scorer ``name``'s two files are missing from ``options["directory"]``."""

    def check(options: Mapping[str, Any]) -> str | None:
        directory = Path(options.get("directory") or scorer_dir())
        missing = [p for p in (directory / f"{name}.safetensors", directory / f"{name}.json") if not p.is_file()]
        return f"missing {', '.join(map(str, missing))}" if missing else None

    return check
