"""Small helpers of the patch: class-name checks and finding the UNet."""
import torch


def is_class(module: object, name: str) -> bool:
    """True when `module` is an instance of a class called `name` (checked by name, no import needed)."""
    return any(cls.__name__ == name for cls in type(module).__mro__)


def find_unet(model: torch.nn.Module) -> torch.nn.Module:
    """The UNetModel of a LatentDiffusion (`model.model.diffusion_model`), or `model` itself if it is one."""
    if is_class(model, "UNetModel"):
        return model
    inner = getattr(getattr(model, "model", None), "diffusion_model", None)
    if inner is None or not is_class(inner, "UNetModel"):
        raise TypeError(
            f"expected an ldm LatentDiffusion or UNetModel, got {type(model).__name__}; "
            f"datosd patches the CompVis UNet (model.model.diffusion_model)."
        )
    return inner


def cross_attention_layers(unet: torch.nn.Module) -> list:
    """The `attn2` (cross-attention) of every BasicTransformerBlock, in module order (input, middle, output)."""
    return [module.attn2 for module in unet.modules() if is_class(module, "BasicTransformerBlock")]
