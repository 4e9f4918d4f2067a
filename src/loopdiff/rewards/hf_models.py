"""Loading transformers reward models and preparing decoded images for them.

Shared by the rewards that run a transformers model (BLIP-VQA, OWLv2, CLIP, captioner, BERT):

- :class:`HuggingFaceScorer`, their base: it loads the model for inference with its tokenizer and
  image settings and scores ``batch_size`` items at a time;
- :func:`load_pretrained` loads any ``from_pretrained`` class from a local folder or a Hub id and
  turns a failure into a :class:`RewardError` naming the reward and the path;
- :func:`image_processor_settings` reads the model's image size, mean and std from its saved
  image-processor config (without running that processor);
- :func:`resize_normalize` does the resizing and normalisation on tensors, on the reward model's
  device, quantising to 8-bit levels first as the references do (they read PNG files).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Mapping, Sequence, TypeVar

import torch
import torch.nn.functional as F

from loopdiff.rewards.base import RewardError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """``"float16"``/``"bf16"``/``torch.float32``/``None`` -> a torch dtype (default float32)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
    value = getattr(torch, aliases.get(dtype, dtype), None)
    if not isinstance(value, torch.dtype):
        raise RewardError(f"dtype {dtype!r} is not a torch dtype; expected e.g. 'float32', 'float16', 'bfloat16'")
    return value


def _looks_like_local_path(model: str) -> bool:
    return os.path.isabs(model) or model.startswith((".", "~"))


def load_pretrained(loader: Any, model: str | os.PathLike, reward: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained(model, **kwargs)``, or a :class:`RewardError` naming ``reward`` and ``model``."""
    path = os.fspath(model)
    what = getattr(loader, "__name__", str(loader))
    if _looks_like_local_path(path) and not os.path.isdir(os.path.expanduser(path)):
        raise RewardError(f"reward '{reward}': model folder '{path}' does not exist (needed for {what})")
    try:
        return loader.from_pretrained(os.path.expanduser(path), **kwargs)
    except (OSError, ValueError, KeyError) as error:
        where = "local folder" if os.path.isdir(os.path.expanduser(path)) else "Hub id (or missing folder)"
        raise RewardError(
            f"reward '{reward}': cannot load {what} from {where} '{path}': {error}. "
            "Point the reward's 'model' option at a folder holding the weights (save_pretrained layout)."
        ) from error


def for_inference(network: Any, device: str | torch.device, dtype: Any) -> Any:
    """``network`` moved to ``device``/``dtype``, in eval mode, without gradients."""
    network = network.to(device=torch.device(device), dtype=resolve_dtype(dtype)).eval()
    network.requires_grad_(False)
    return network


def load_model(loader: Any, model: str | os.PathLike, reward: str, device: str | torch.device, dtype: Any) -> Any:
    """Load a transformers model, move it to ``device``/``dtype`` and set eval mode (no gradients)."""
    return for_inference(load_pretrained(loader, model, reward), device, dtype)


@dataclass(frozen=True)
class ImageSettings:
    """How a model expects its pixels: square side, resampling, mean and std."""

    size: int
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD


def image_processor_settings(model: str | os.PathLike, default_size: int) -> ImageSettings:
    """The image size, mean and std from the model's saved image-processor config, or CLIP's defaults."""
    try:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(os.fspath(model))
    except (OSError, ValueError, KeyError, ImportError):
        return ImageSettings(default_size)
    side = _side(getattr(processor, "crop_size", None)) or _side(getattr(processor, "size", None)) or default_size
    mean = tuple(getattr(processor, "image_mean", None) or OPENAI_CLIP_MEAN)
    std = tuple(getattr(processor, "image_std", None) or OPENAI_CLIP_STD)
    return ImageSettings(int(side), mean, std)  # type: ignore[arg-type]


def _side(size: Any) -> int | None:
    """The square side in an image processor's ``size``/``crop_size`` (a dict or a SizeDict)."""
    if not size:
        return None
    get = size.get if hasattr(size, "get") else lambda key: getattr(size, key, None)
    return get("height") or get("shortest_edge")


def check_images(images: torch.Tensor, reward: str) -> torch.Tensor:
    """Validate a ``(N, 3, H, W)`` batch in [0, 1] and return it as float32."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise RewardError(f"reward '{reward}' expects images (N, 3, H, W); got shape {tuple(images.shape)}")
    return images.detach().float()


def quantize_8bit(images: torch.Tensor) -> torch.Tensor:
    """Round to the 256 levels of an 8-bit PNG (what the references read from disk)."""
    return (images.clamp(0, 1) * 255).round() / 255


def resize(images: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Antialiased resize of ``(N, C, H, W)`` in [0, 1] to ``size`` (one float pass)."""
    return F.interpolate(images, size=size, mode=mode, antialias=True, align_corners=False).clamp(0, 1)


def resize_like_pil(images: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Resize 8-bit images as PIL does: a horizontal then a vertical pass, each rounded to 8 bits.

    Matches ``PIL.Image.resize`` (BICUBIC/BILINEAR) within one or two grey levels.
    """
    height, width = images.shape[-2:]
    if width != size[1]:
        images = quantize_8bit(resize(images, (height, size[1]), mode))
    if height != size[0]:
        images = quantize_8bit(resize(images, size, mode))
    return images


def resize_normalize(
    images: torch.Tensor,
    settings: ImageSettings,
    mode: str = "bicubic",
    crop: bool = False,
    quantize: bool = True,
) -> torch.Tensor:
    """``(N, 3, H, W)`` in [0, 1] -> normalised model pixels of side ``settings.size``.

    ``crop=False`` resizes to a square (BLIP's ``Resize((s, s))``); ``crop=True`` resizes the short
    side and centre-crops (CLIP). With ``quantize`` the images are 8-bit and resized as PIL resizes
    them (:func:`resize_like_pil`), as the references do on PNG files.
    """
    x = quantize_8bit(images) if quantize else images.clamp(0, 1)
    height, width = x.shape[-2:]
    side = settings.size
    if crop:
        scale = side / min(height, width)
        target = (max(side, int(height * scale)), max(side, int(width * scale)))  # as transformers' resize
    else:
        target = (side, side)
    if (height, width) != target:
        x = resize_like_pil(x, target, mode) if quantize else resize(x, target, mode)
    if crop:
        top, left = (x.shape[-2] - side) // 2, (x.shape[-1] - side) // 2
        x = x[..., top : top + side, left : left + side]
    mean = torch.tensor(settings.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(settings.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def chunks(n: int, size: int) -> Iterator[slice]:
    """Slices ``[0, size), [size, 2 size), ...`` covering ``range(n)``."""
    if size < 1:
        raise RewardError(f"batch_size must be >= 1, got {size}")
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def concat(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The parts concatenated along the first dimension (an empty tensor for no parts)."""
    return torch.cat(list(parts)) if parts else torch.zeros(0)


def pooled_features(output: Any) -> torch.Tensor:
    """``get_image_features``/``get_text_features`` output as a tensor (transformers 4 returns one, 5 an output)."""
    return output if torch.is_tensor(output) else output.pooler_output


def model_device(network: torch.nn.Module) -> torch.device:
    return next(network.parameters()).device


def model_dtype(network: torch.nn.Module) -> torch.dtype:
    return next(network.parameters()).dtype


Chunk = TypeVar("Chunk")


class HuggingFaceScorer:
    """Base of the scorers over one transformers model, run for inference ``batch_size`` items at a time.

    ``network`` is a transformers class loaded from ``model`` (a folder or Hub id) or an already built
    module; either way it ends on ``device`` in ``dtype``, in eval mode without gradients, as
    ``self.model``. The tokenizer (unless ``needs_tokenizer`` is false) and, for a model with a vision
    tower, the image settings come from ``processor`` (default ``model``). A subclass says how one chunk
    is scored (:meth:`score_chunk`, or its own function given to :meth:`in_chunks`).
    """

    needs_tokenizer: ClassVar[bool] = True

    def __init__(
        self,
        network: Any,
        model: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: Any = torch.float32,
        batch_size: int = 16,
        name: str = "reward",
        processor: str | os.PathLike | None = None,
    ):
        self.name = name
        self.batch_size = batch_size
        if isinstance(network, torch.nn.Module):
            self.model = for_inference(network, device, dtype)
        else:
            self.model = load_model(network, model, name, device, dtype)
        source = processor or model
        if self.needs_tokenizer:
            from transformers import AutoTokenizer

            self.tokenizer = load_pretrained(AutoTokenizer, source, name)
        vision = getattr(self.model.config, "vision_config", None)
        self.settings: ImageSettings | None = (
            image_processor_settings(source, vision.image_size) if vision is not None else None
        )

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    @property
    def dtype(self) -> torch.dtype:
        return model_dtype(self.model)

    def model_pixels(self, images: torch.Tensor, settings: ImageSettings | None = None, **options: Any) -> torch.Tensor:
        """:func:`resize_normalize` of ``images`` (default ``self.settings``) on the model's device, in its dtype."""
        settings = settings or self.settings
        assert settings is not None, f"{type(self).__name__} has no image settings"
        return resize_normalize(images.to(self.device), settings, **options).to(self.dtype)

    def in_chunks(self, score_chunk: Callable[..., Chunk], *columns: Sequence[Any]) -> list[Chunk]:
        """``score_chunk`` of each ``batch_size`` slice of the columns (as long as the shortest), without gradients."""
        size = min(len(column) for column in columns)
        with torch.no_grad():
            return [score_chunk(*(column[part] for column in columns)) for part in chunks(size, self.batch_size)]

    def score_chunk(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """The scores (CPU float32) of one chunk of images and their prompts."""
        raise NotImplementedError

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """:meth:`score_chunk` over all images, ``batch_size`` at a time, concatenated."""
        return concat(self.in_chunks(self.score_chunk, check_images(images, self.name), prompts))

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> torch.Tensor:
        return self.score(images, prompts)


def weights_check(default_model: str, option: str = "model"):
    """A registry ``check``: why the weights named by ``options[option]`` cannot be loaded here, or ``None``.

    A local folder must exist; a Hub id must be in the local Hugging Face cache when ``HF_HUB_OFFLINE``
    is set (otherwise it may still be downloaded, so it is not reported).
    """

    def check(options: Any) -> str | None:
        model = os.path.expanduser(os.fspath(options.get(option, default_model)))
        if os.path.isdir(model):
            return None
        if _looks_like_local_path(model):
            return f"model folder '{model}' does not exist"
        if not _hub_offline():
            return None
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "config.json")
        except Exception:  # an invalid repo id, an old huggingface_hub: treat as not cached
            cached = None
        if isinstance(cached, str):
            return None
        return f"'{model}' is not a local folder and not in the Hugging Face cache (HF_HUB_OFFLINE is set)"

    return check


def checkpoint_and_weights_check(file_name: str, default_model: str):
    """A registry ``check`` for a reward that needs option ``checkpoint=<file_name>`` (a file) besides the
    model weights of :func:`weights_check`."""

    def check(options: Any) -> str | None:
        checkpoint = options.get("checkpoint")
        if checkpoint is None:
            return f"needs option checkpoint=<path to {file_name}>"
        if not os.path.isfile(os.path.expanduser(os.fspath(checkpoint))):
            return f"checkpoint '{checkpoint}' not found"
        return weights_check(default_model)(options)

    return check


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
