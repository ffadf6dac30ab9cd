"""Small helpers of the patches: class-name checks, finding the UNet and where its attention starts, the
model's sampling hooks, and the cross-attention class swap that text pruning and T-GATE share."""
from typing import Optional

import torch

from ldm.models.diffusion.hooks import SamplingHook, SamplingHooks


def is_class(module: object, name: str) -> bool:
    """True when `module` is an instance of a class called `name` (checked by name, no import needed)."""
    return any(cls.__name__ == name for cls in type(module).__mro__)


def is_diffusers_model(model: object) -> bool:
    """True for a diffusers UNet2DConditionModel or a pipeline holding one as `.unet` (checked by name)."""
    return is_class(model, "UNet2DConditionModel") or is_class(getattr(model, "unet", None), "UNet2DConditionModel")


def model_family(model: object) -> str:
    """'diffusers' (a pipeline or its UNet2DConditionModel), 'sgm' (a generative-models DiffusionEngine, SDXL)
    or 'ldm' (a CompVis LatentDiffusion, SD 1.x / 2.x, or a bare UNetModel)."""
    if is_diffusers_model(model):
        return "diffusers"
    if hasattr(model, "conditioner") and hasattr(model, "denoiser"):
        return "sgm"
    return "ldm"


def any_unet(model: object) -> torch.nn.Module:
    """The UNet of any model the patches take: a diffusers pipeline's `.unet` (or that UNet itself), else the
    UNetModel `find_unet` finds."""
    if is_diffusers_model(model):
        return model if is_class(model, "UNet2DConditionModel") else model.unet
    return find_unet(model)


def find_unet(model: torch.nn.Module) -> torch.nn.Module:
    """The UNetModel of a LatentDiffusion or an SDXL DiffusionEngine (`model.model.diffusion_model`), or
    `model` itself if it is one."""
    if is_class(model, "UNetModel"):
        return model
    inner = getattr(getattr(model, "model", None), "diffusion_model", None)
    if inner is None or not is_class(inner, "UNetModel"):
        raise TypeError(
            f"expected an ldm LatentDiffusion or UNetModel (or an sgm DiffusionEngine), got {type(model).__name__}; "
            f"datosd patches the CompVis UNet (model.model.diffusion_model)."
        )
    return inner


def sampling_hooks_of(model: torch.nn.Module) -> Optional[SamplingHooks]:
    """The `sampling_hooks` through which a model's samplers announce runs, steps and UNet calls; None for a
    bare UNetModel (its user drives the patch's state by hand). TypeError for a model without them: nothing
    would tell the patch where a run and its steps begin."""
    if is_class(model, "UNetModel"):
        return None
    hooks = getattr(model, "sampling_hooks", None)
    if not isinstance(hooks, SamplingHooks):
        raise TypeError(
            f"{type(model).__name__} has no sampling_hooks: its samplers cannot tell the patch where a run and its "
            f"steps begin, so every UNet call would compute in full. Sample it with this repository's ldm / sgm "
            f"samplers (they announce runs and steps), or patch its UNet (model.model.diffusion_model) and drive "
            f"the returned state by hand: state.sampling_started(num_steps) before a run, state.step_started(i) and "
            f"state.model_call(cfg_halves) before the UNet calls of step i, state.sampling_finished() after it.")
    return hooks


def check_not_merged(unet: torch.nn.Module, blocks: list) -> None:
    """Refuse to prune transformer blocks that tomesd patched: its block forward replaces the one DaTo prunes in."""
    if any(is_class(block, "ToMeBlock") for block in blocks):
        raise TypeError("the UNet's transformer blocks are patched by tomesd (ToMeSD), whose block forward replaces "
                        "the one DaTo prunes in, so DaTo's pruning would be lost; DaTo and ToMeSD do not combine: "
                        "remove it first (tomesd.remove_patch)")


def _has_attention(block: torch.nn.Module) -> bool:
    return any(is_class(m, "SpatialTransformer") for m in block.modules())


def attention_downsample(model: torch.nn.Module) -> int:
    """How many times the latent is halved before the first input block with a SpatialTransformer: 1 for
    SD 1.x/2.x (attention at the latent resolution), 2 for SDXL (none at 128x128, the first at 64x64 for a
    1024x1024 image). Its token count is DaTo's N_max (spec 6); it is also the `max_downsample` that
    `tomesd.apply_patch` needs to merge at that level (tomesd's default 1 merges nothing on SDXL). A diffusers
    UNet's levels are its down blocks."""
    if is_diffusers_model(model):
        levels = [i for i, down in enumerate(any_unet(model).down_blocks) if getattr(down, "attentions", None)]
        if not levels:
            raise ValueError("the UNet has no attention in its down blocks")
        return 2 ** levels[0]
    downsample = 1
    for block in find_unet(model).input_blocks:
        if _has_attention(block):
            return downsample
        if any(is_class(m, "Downsample") for m in block.modules()):
            downsample *= 2
    raise ValueError("the UNet has no SpatialTransformer in its input blocks")


def attention_depth(model: torch.nn.Module) -> int:
    """The smallest cache depth (spec 2) whose computed blocks include a SpatialTransformer: 1 for SD 1.x
    (output_blocks[11] has attention), 4 for SDXL (output_blocks[5], block id 3), so an SDXL depth-1..3 step
    runs no attention at all."""
    unet = find_unet(model)
    n_blocks = len(unet.output_blocks)
    ids = [k for k, block in enumerate(unet.input_blocks) if _has_attention(block)]
    ids += [n_blocks - 1 - j for j, block in enumerate(unet.output_blocks) if _has_attention(block)]
    if not ids:
        raise ValueError("the UNet has no SpatialTransformer in its input or output blocks")
    return min(ids) + 1


def cross_attention_layers(unet: torch.nn.Module) -> list:
    """The `attn2` (cross-attention) of every BasicTransformerBlock, in module order (input, middle, output)."""
    return [module.attn2 for module in unet.modules() if is_class(module, "BasicTransformerBlock")]


def self_attention_layers(unet: torch.nn.Module) -> list:
    """The `attn1` (self-attention) of every BasicTransformerBlock, in module order (input, middle, output)."""
    return [module.attn1 for module in unet.modules() if is_class(module, "BasicTransformerBlock")]


def patch_cross_attention(model: torch.nn.Module, attribute: str, state, make_class, purpose: str,
                          conflicts: dict) -> list:
    """Give every `attn2` of the model's UNet the class make_class(its class) and `state` (a `HookedState`) as
    `attribute` (the UNet carries it too); `state` joins the model's sampling hooks. Returns the layers, in module
    order. purpose: what the layers are patched to do (for the error message); conflicts: {attribute of
    another cross-attention patch: the error to raise when the UNet has it}."""
    unet = find_unet(model)
    for other, message in conflicts.items():
        if getattr(unet, other, None) is not None:
            raise ValueError(message)
    layers = cross_attention_layers(unet)
    if not layers:
        raise ValueError(f"the UNet has no cross-attention (attn2) layers to {purpose}")
    hooks = sampling_hooks_of(model)
    setattr(unet, attribute, state)
    for layer in layers:
        setattr(layer, attribute, state)
        layer.__class__ = make_class(layer.__class__)
    if hooks is not None:
        state.join_hooks(hooks)
    return layers


def unpatch_cross_attention(model: torch.nn.Module, attribute: str):
    """Undo `patch_cross_attention`: the layers' original classes, no `attribute`, the state out of the
    sampling hooks. Returns the state it removed (None when the model had none)."""
    unet = find_unet(model)
    state = getattr(unet, attribute, None)
    if state is None:
        return None
    for module in unet.modules():
        if module is not unet and getattr(module, attribute, None) is state:
            module.__class__ = module._parent
            delattr(module, attribute)
    delattr(unet, attribute)
    state.leave_hooks()
    return state


class HookedState(SamplingHook):
    """A patch's state that listens to its model's sampling hooks (`hooks`: the ones it joined, or None)."""

    hooks: Optional[SamplingHooks] = None

    def join_hooks(self, hooks: SamplingHooks) -> None:
        hooks.add(self)
        self.hooks = hooks

    def leave_hooks(self) -> None:
        if self.hooks is not None and self in self.hooks:
            self.hooks.remove(self)
