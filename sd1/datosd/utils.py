"""Small helpers of the patch: class-name checks, finding the UNet and where its attention starts."""
import torch


def is_class(module: object, name: str) -> bool:
    """True when `module` is an instance of a class called `name` (checked by name, no import needed)."""
    return any(cls.__name__ == name for cls in type(module).__mro__)


def is_diffusers_model(model: object) -> bool:
    """True for a diffusers UNet2DConditionModel or a pipeline holding one as `.unet` (checked by name)."""
    return is_class(model, "UNet2DConditionModel") or is_class(getattr(model, "unet", None), "UNet2DConditionModel")


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


def _has_attention(block: torch.nn.Module) -> bool:
    return any(is_class(m, "SpatialTransformer") for m in block.modules())


def attention_downsample(model: torch.nn.Module) -> int:
    """How many times the latent is halved before the first input block with a SpatialTransformer: 1 for
    SD 1.x/2.x (attention at the latent resolution), 2 for SDXL (none at 128x128, the first at 64x64 for a
    1024x1024 image). Its token count is DaTo's N_max (spec 6); it is also the `max_downsample` that
    `tomesd.apply_patch` needs to merge at that level (tomesd's default 1 merges nothing on SDXL)."""
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


def patch_cross_attention(model: torch.nn.Module, attribute: str, state, make_class, purpose: str,
                          conflicts: dict) -> list:
    """Give every `attn2` of the model's UNet the class make_class(its class) and `state` as `attribute`
    (the UNet carries it too), and add `state` to the model's sampling hooks. Returns the layers, in module
    order. purpose: what the layers are patched to do (for the error message); conflicts: {attribute of
    another cross-attention patch: the error to raise when the UNet has it}."""
    unet = find_unet(model)
    for other, message in conflicts.items():
        if getattr(unet, other, None) is not None:
            raise ValueError(message)
    layers = cross_attention_layers(unet)
    if not layers:
        raise ValueError(f"the UNet has no cross-attention (attn2) layers to {purpose}")
    setattr(unet, attribute, state)
    for layer in layers:
        setattr(layer, attribute, state)
        layer.__class__ = make_class(layer.__class__)
    hooks = getattr(model, "sampling_hooks", None)
    if hooks is not None:
        hooks.add(state)
        state.hooks = hooks
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
    if state.hooks is not None:
        state.hooks.remove(state)
    return state
