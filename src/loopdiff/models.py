"""Loading the pipeline to fine-tune, choosing what trains (full UNet or LoRA), and the reference policy.

Four kinds of pipeline: Stable-Diffusion format (UNet + DDIM, :class:`DiffusionPolicy`), SDXL format
(``StableDiffusionXLPipeline``: the same UNet policy, conditioned also on pooled text embeddings and size time
ids through :class:`SDXLPromptEncoder`), SD3 format (``StableDiffusion3Pipeline``: SD3 transformer +
flow-matching Euler scheduler, :class:`FlowMatchPolicy`) and Flux format (``FluxPipeline``: Flux transformer,
packed latents and embedded guidance, :class:`FluxPolicy`). The last two are the flow-matching kinds
(:func:`is_flow_matching`). ``load_pipeline`` reads the kind from the folder's ``model_index.json``;
:func:`denoiser` and :func:`build_policies` route the rest by the loaded pipeline's kind. The trained module is
called ``unet`` throughout the training code whichever kind it is.
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Any, Iterator

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, StableDiffusionPipeline

from loopdiff.config import ConfigError, ModelConfig, SamplingConfig
from loopdiff.plugins import registered_models

FLOW_PIPELINES = ("StableDiffusion3Pipeline", "FluxPipeline")  # the model_index.json class names loaded as such


def resolve_pretrained(name: str) -> str:
    """A registered model's name (``"embedded"``) -> its pipeline folder; a local folder or a Hub id as it is."""
    entry = registered_models().get(name)
    return str(entry.folder()) if entry is not None else name


def pipeline_source(pipe: Any) -> str | None:
    """The folder or Hub id ``pipe`` was loaded from (diffusers' ``_name_or_path``), or None for a pipeline built
    in memory."""
    source = getattr(pipe, "name_or_path", None)  # a str, or the Path from_pretrained was given
    return str(source) if source else None


def pipeline_model_name(pipe: Any) -> str:
    """``model.pretrained`` for a pipeline passed in: the registered model whose folder it was loaded from
    (``embedded``), else its folder or Hub id. Raises ConfigError for a pipeline built in memory (no name)."""
    source = pipeline_source(pipe)
    if source is None:
        raise ConfigError(f"the {type(pipe).__name__} passed in was built in memory (it has no folder or Hub id): "
                          "set model.pretrained to name it for config.json and the model card")
    for name, entry in registered_models().items():
        if Path(source).expanduser().resolve() == entry.folder().resolve():
            return name
    return source


def check_passed_pipeline(model: ModelConfig, pipe: Any) -> None:
    """Raise ConfigError when ``model.pretrained`` names a registered model (whose default prompts and rewards
    the config then took) while the pipeline passed in was loaded from another folder or Hub id."""
    source = pipeline_source(pipe)
    if source is None or model.pretrained not in registered_models():
        return
    name = pipeline_model_name(pipe)
    if name != model.pretrained:
        raise ConfigError(f"model.pretrained={model.pretrained!r} but the pipeline passed in was loaded from "
                          f"'{source}': set model.pretrained='{source}' with the run's own prompts.train and "
                          "prompts.val (loopdiff.train does so when model.pretrained is unset)")


def _model_index(source: str, looks_local: bool, revision: str | None) -> dict[str, Any]:
    """The pipeline's ``model_index.json`` (empty when a Hub id's cannot be read: the loader then reports)."""
    if looks_local:
        return json.loads((Path(source).expanduser() / "model_index.json").read_text())
    try:
        from diffusers import DiffusionPipeline

        return dict(DiffusionPipeline.load_config(source, revision=revision))
    except (OSError, ValueError):
        return {}


def is_flow_matching(pipe: Any) -> bool:
    """Whether ``pipe`` is an SD3- or Flux-format pipeline (a transformer with a flow-matching Euler scheduler)."""
    return getattr(pipe, "transformer", None) is not None and isinstance(
        pipe.scheduler, FlowMatchEulerDiscreteScheduler
    )


def is_flux(pipe: Any) -> bool:
    """Whether ``pipe`` is a Flux-format pipeline (``FluxPipeline``: packed latents, embedded guidance)."""
    from diffusers import FluxPipeline

    return isinstance(pipe, FluxPipeline)


def pipeline_class_name(pipe: Any) -> str:
    """The diffusers class that loads ``pipe``'s kind (what an export's model card tells users to call)."""
    if is_flow_matching(pipe):
        return "FluxPipeline" if is_flux(pipe) else "StableDiffusion3Pipeline"
    return "StableDiffusionXLPipeline" if is_sdxl(pipe) else "StableDiffusionPipeline"


def is_sdxl(pipe: Any) -> bool:
    """Whether ``pipe`` is an SDXL-format pipeline (a UNet conditioned on two text encoders and size time ids)."""
    from diffusers import StableDiffusionXLPipeline

    return isinstance(pipe, StableDiffusionXLPipeline)


def denoiser(pipe: Any) -> torch.nn.Module:
    """The module that trains: the SD3 or Flux transformer, or the UNet."""
    return pipe.transformer if is_flow_matching(pipe) else pipe.unet


def text_encoders(pipe: Any) -> list[torch.nn.Module]:
    """The pipeline's text encoders (one for Stable Diffusion, two for SDXL and Flux, two or three for SD3)."""
    names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    return [m for m in (getattr(pipe, name, None) for name in names) if m is not None]


def _load_flow_pipeline(source: str, config: ModelConfig, index: dict[str, Any]) -> Any:
    """A StableDiffusion3Pipeline or FluxPipeline (``index["_class_name"]``), with its flow-matching scheduler."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    kind = index["_class_name"]
    if kind == "FluxPipeline":
        pipe = FluxPipeline.from_pretrained(source, revision=config.revision)
    else:
        # a pipeline saved without T5 has no text_encoder_3 entry; diffusers needs the absence said explicitly
        absent = {name: None for name in ("text_encoder_3", "tokenizer_3") if (index.get(name) or [None])[0] is None}
        pipe = StableDiffusion3Pipeline.from_pretrained(source, revision=config.revision, **absent)
    if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
        raise ConfigError(
            f"model.pretrained='{config.pretrained}': a {kind} needs a FlowMatchEulerDiscreteScheduler, "
            f"not {type(pipe.scheduler).__name__}"
        )
    return pipe


def load_pipeline(config: ModelConfig) -> StableDiffusionPipeline:
    """Load a Stable-Diffusion-format pipeline, or an SDXL-format one (``_class_name``
    StableDiffusionXLPipeline), with a DDIM scheduler, or an SD3- or Flux-format one (StableDiffusion3Pipeline,
    FluxPipeline) with its flow-matching scheduler; the VAE and the text encoders frozen."""
    source = resolve_pretrained(config.pretrained)
    looks_local = source.startswith((".", "/", "~")) or Path(source).exists()
    if looks_local:
        check_pipeline_folder(config.pretrained, Path(source).expanduser())
    index = _model_index(str(Path(source).expanduser()) if looks_local else source, looks_local, config.revision)
    if index.get("_class_name") in FLOW_PIPELINES:
        try:
            pipe = _load_flow_pipeline(str(Path(source).expanduser()) if looks_local else source, config, index)
        except (OSError, ValueError) as error:
            message = " ".join(str(error).split())
            raise ConfigError(f"model.pretrained='{config.pretrained}' could not be loaded: {message}") from None
        pipe.vae.requires_grad_(False)
        for encoder in text_encoders(pipe):
            encoder.requires_grad_(False)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    try:
        if index.get("_class_name") == "StableDiffusionXLPipeline":
            from diffusers import StableDiffusionXLPipeline

            pipe = StableDiffusionXLPipeline.from_pretrained(
                str(Path(source).expanduser()) if looks_local else source, revision=config.revision
            )
        else:
            pipe = StableDiffusionPipeline.from_pretrained(
                str(Path(source).expanduser()) if looks_local else source,
                revision=config.revision,
                safety_checker=None,
                requires_safety_checker=False,
            )
    except (OSError, ValueError) as error:
        message = " ".join(str(error).split())
        raise ConfigError(f"model.pretrained='{config.pretrained}' could not be loaded: {message}") from None
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # SDXL ships an Euler scheduler
    pipe.vae.requires_grad_(False)
    for encoder in text_encoders(pipe):
        encoder.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_pipeline_folder(name: str, folder: Path) -> None:
    """Raise ConfigError unless ``folder`` has a readable model_index.json and every component folder it lists."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise ConfigError(f"model.pretrained='{name}': no diffusers pipeline (model_index.json) in '{folder}'")
    try:
        components = json.loads(index.read_text())
    except (UnicodeDecodeError, ValueError) as error:
        raise ConfigError(f"model.pretrained='{name}': '{index}' is not valid JSON ({error})") from None
    listed = [key for key, value in components.items()
              if not key.startswith("_") and isinstance(value, list) and None not in value]
    missing = [key for key in listed if not (folder / key).is_dir()]
    if missing:
        raise ConfigError(f"model.pretrained='{name}': the pipeline folder '{folder}' lacks its component folder "
                          f"'{missing[0]}/' (model_index.json lists {', '.join(listed)})")


def configure_attention(unet: torch.nn.Module, choice: str, device: torch.device) -> None:
    """Pick the attention processor: on the CPU the classic batched-matmul one is faster than SDPA
    for small heads (bench/RESULTS.md: 0.73x the forward+backward time), with the same outputs."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if not isinstance(unet, UNet2DConditionModel):
        return  # an SD3 or Flux transformer keeps its own joint-attention processors
    if choice == "classic" or (choice == "auto" and device.type == "cpu"):
        unet.set_attn_processor(AttnProcessor())
    elif choice == "sdpa":
        unet.set_attn_processor(AttnProcessor2_0())


def configure_tf32(enabled: bool, device: torch.device) -> None:
    """On a CUDA device, let float32 matmuls and convolutions run on TF32 tensor cores (``enabled``) or keep
    them exact; elsewhere nothing changes (the CPU has no TF32)."""
    if device.type != "cuda":
        return
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled


def compile_denoiser(model: torch.nn.Module) -> None:
    """``torch.compile`` the denoiser in place (``Module.compile``): the module, its parameters, hooks and
    state-dict names stay the same objects, so LoRA, checkpoints and the wrappers of distributed training see
    no difference; its calls run the compiled graph."""
    model.compile()


def latent_size(pipe: Any, resolution: int | None) -> int | None:
    """The latents' height and width for images of ``resolution`` pixels (None: the denoiser's native size).

    Raises ConfigError when the pipeline cannot sample at that size: ``resolution`` must be a multiple of the
    VAE's downscale times what the denoiser divides the latents by (2 per UNet level after the first, an SD3
    transformer's patch size, or 2 for the 2x2 patches a Flux pipeline packs into tokens), and an SD3
    transformer has position embeddings for ``pos_embed_max_size`` patches per side at most (Flux's rotary
    position embeddings have no such bound).
    """
    if resolution is None:
        return None
    model, vae_factor = denoiser(pipe), pipe.vae_scale_factor
    if is_flux(pipe):
        step, why = 2, "x 2 for the 2x2 latent patches Flux packs into tokens"
    elif is_flow_matching(pipe):
        step, why = model.config.patch_size, f"x the transformer's patch size {model.config.patch_size}"
    else:
        levels = len(model.config.block_out_channels)
        step, why = 2 ** (levels - 1), f"x 2^{levels - 1} for the UNet's {levels} levels"
    if resolution % (vae_factor * step):
        raise ConfigError(f"sampling.resolution={resolution} is invalid; allowed: a multiple of {vae_factor * step} "
                          f"(the VAE's downscale {vae_factor} {why}), or none for the native size")
    size = resolution // vae_factor
    most = getattr(model.config, "pos_embed_max_size", None) if is_flow_matching(pipe) else None  # none for Flux
    if most is not None and size // step > most:
        raise ConfigError(f"sampling.resolution={resolution} is invalid; allowed: at most {most * step * vae_factor} "
                          f"px ({most} patches per side, the transformer's pos_embed_max_size)")
    return size


def build_policies(
    pipe: Any, rollout_model: torch.nn.Module, train_model: torch.nn.Module, sampling: SamplingConfig,
    device: torch.device,
) -> tuple[Any, Any, Any]:
    """(sampling policy, training policy, prompt encoder) for the pipeline's kind.

    UNet pipelines: :class:`DiffusionPolicy` with DDIM eta = ``sampling.eta`` (conditioned on
    :class:`SDXLPromptEncoder`'s embeddings for SDXL). SD3 pipelines: :class:`FlowMatchPolicy` with the SDE
    noise level a = ``sampling.eta`` and form ``sampling.sde_type``; Flux pipelines: :class:`FluxPolicy`, the
    same SDE with ``sampling.guidance_scale`` embedded (one conditional call), prompts encoded with
    ``sampling.max_sequence_length`` T5 tokens (both flow kinds; the pipeline's default when unset). All sample
    images of ``sampling.resolution`` pixels (:func:`latent_size`; the denoiser's native size when unset, for
    Flux FluxPipeline's ``default_sample_size``). The encoder's unconditional embeddings are those of
    ``sampling.negative_prompt`` (refused for Flux, which has no unconditional branch).
    """
    from loopdiff.sampling.policy import DiffusionPolicy, PolicyConfig
    from loopdiff.sampling.trajectories import PromptEncoder

    sample_size = latent_size(pipe, getattr(sampling, "resolution", None))
    negative_prompt = getattr(sampling, "negative_prompt", "")

    if is_flow_matching(pipe):
        from loopdiff.sampling.flow_policy import FlowMatchPolicy, FlowPolicyConfig, SD3PromptEncoder
        from loopdiff.sampling.flux import FluxPolicy, FluxPromptEncoder

        flux = is_flux(pipe)
        flow_config = FlowPolicyConfig(
            guidance_scale=sampling.guidance_scale,
            noise_level=sampling.eta,
            num_steps=sampling.num_steps,
            reduction=sampling.logprob_reduction,  # type: ignore[arg-type]
            sde_type=getattr(sampling, "sde_type", "sde"),  # type: ignore[arg-type]
            sample_size=sample_size or (pipe.default_sample_size if flux else None),
        )
        policy_class, encoder_class = (FluxPolicy, FluxPromptEncoder) if flux else (FlowMatchPolicy, SD3PromptEncoder)
        tokens = getattr(sampling, "max_sequence_length", None)
        if tokens is None and not flux:  # an SD3 folder may record the zero-T5-token count it was trained with
            tokens = pipe.transformer.config.get("max_sequence_length")
        flow_encoder = encoder_class(pipe, device, **({} if tokens is None else {"max_sequence_length": tokens}))
        if not policy_class.classifier_free and negative_prompt:
            raise ConfigError(f"sampling.negative_prompt={negative_prompt!r} is not used by a Flux pipeline (one "
                              "conditional call per step, no classifier-free guidance); unset it")
        flow_encoder.negative_prompt = negative_prompt
        return (
            policy_class(rollout_model, pipe.scheduler, flow_config),
            policy_class(train_model, pipe.scheduler, flow_config),
            flow_encoder,
        )
    policy_config = PolicyConfig(
        guidance_scale=sampling.guidance_scale,
        eta=sampling.eta,
        num_steps=sampling.num_steps,
        reduction=sampling.logprob_reduction,  # type: ignore[arg-type]
        sample_size=sample_size,
    )
    if is_sdxl(pipe):
        from loopdiff.sampling.sdxl import SDXLPromptEncoder

        encoder: Any = SDXLPromptEncoder(pipe, device, sample_size)
    else:
        encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder, device)
    encoder.negative_prompt = negative_prompt
    return (
        DiffusionPolicy(rollout_model, pipe.scheduler, policy_config),
        DiffusionPolicy(train_model, pipe.scheduler, policy_config),
        encoder,
    )


def cross_attention_kv(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The key and value projections of every cross-attention layer: the only weights that read the prompt
    (the part Custom Diffusion fine-tunes, Kumari et al. 2023)."""
    params = [
        p
        for name, module in unet.named_modules()
        if name.endswith("attn2")
        for projection in (module.to_k, module.to_v)
        for p in projection.parameters()
    ]
    if not params:
        raise ValueError("model.train_modules='cross_attention': this UNet has no cross-attention (attn2) layers")
    return params


def configure_trainable(unet: torch.nn.Module, config: ModelConfig) -> list[torch.nn.Parameter]:
    """Full fine-tuning (every UNet weight), the cross-attention keys and values only, or LoRA adapters via
    peft (:func:`loopdiff.lora.add_lora`)."""
    if config.lora:
        from loopdiff.lora import add_lora

        add_lora(unet, config)
    elif config.train_modules == "cross_attention":
        unet.requires_grad_(False)
        for p in cross_attention_kv(unet):
            p.requires_grad_(True)
    else:
        unet.requires_grad_(True)
    return [p for p in unet.parameters() if p.requires_grad]


def trainable_state_dict(unet: torch.nn.Module, lora: bool) -> dict[str, torch.Tensor]:
    """The weights that training changes: the LoRA adapter (peft format) or the whole UNet, on the CPU.

    A UNet sharded by FSDP has its shards gathered: every process calls this, and the first one gets the
    weights (the others an empty dict).
    """
    from loopdiff.sharding import full_model_state_dict, full_tensors, is_sharded, reshard

    if is_sharded(unet):
        if not lora:
            return {k: v.contiguous() for k, v in full_model_state_dict(unet).items()}
        from peft.utils import get_peft_model_state_dict

        reshard(unet)  # only the adapters are gathered, not the frozen base weights
        adapters = full_tensors((name, p) for name, p in unet.named_parameters() if p.requires_grad)
        return {k: v.contiguous() for k, v in get_peft_model_state_dict(unet, state_dict=adapters).items()} \
            if adapters else {}
    if lora:
        from peft.utils import get_peft_model_state_dict

        return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    return {k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}


def _peft_to_module_keys(unet: torch.nn.Module) -> dict[str, str]:
    """peft's key for each LoRA parameter of ``unet`` (what :func:`trainable_state_dict` writes) -> the
    parameter's name in the module, found by passing placeholders through peft's own renaming."""
    from peft.utils import get_peft_model_state_dict

    placeholders = {name: torch.empty(0) for name, p in unet.named_parameters() if p.requires_grad}
    owner = {id(t): name for name, t in placeholders.items()}
    return {key: owner[id(t)] for key, t in get_peft_model_state_dict(unet, state_dict=placeholders).items()}


def load_trainable_state_dict(unet: torch.nn.Module, state: dict[str, torch.Tensor], lora: bool) -> None:
    """Load :func:`trainable_state_dict`'s output; under FSDP every process holds all of ``state`` and keeps
    its shards."""
    from loopdiff.sharding import is_sharded, load_full_model_state_dict

    if is_sharded(unet):
        if not lora:
            load_full_model_state_dict(unet, state)
            return
        names = _peft_to_module_keys(unet)
        unexpected = sorted(set(state) - set(names))
        if unexpected:
            raise ValueError(f"LoRA checkpoint has unexpected keys: {unexpected[:5]}")
        load_full_model_state_dict(unet, {names[k]: v for k, v in state.items()}, strict=False)
        return
    if lora:
        from peft.utils import set_peft_model_state_dict

        result = set_peft_model_state_dict(unet, state)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"LoRA checkpoint has unexpected keys: {result.unexpected_keys[:5]}")
    else:
        unet.load_state_dict(state)


class ReferencePolicy:
    """The pre-trained policy for a KL penalty: the UNet with LoRA disabled, or a frozen copy."""

    def __init__(self, unet: torch.nn.Module, lora: bool):
        self.unet, self.lora = unet, lora
        self.frozen = None if lora else copy.deepcopy(unet).requires_grad_(False).eval()

    @contextlib.contextmanager
    def active(self) -> Iterator[torch.nn.Module]:
        """Yield a module computing the reference policy's noise prediction."""
        if self.frozen is not None:
            yield self.frozen
            return
        self.unet.disable_adapters()
        try:
            yield self.unet
        finally:
            self.unet.enable_adapters()
