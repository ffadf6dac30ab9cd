"""Small helpers of the patch: class-name checks and finding the UNet."""
import torch


def is_class(module: object, name: str) -> bool:
    """True when `module` is an instance of a class called `name` (checked by name, no import needed)."""
    return any(cls.__name__ == name for cls in type(module).__mro__)


def is_diffusers_model(model: object) -> bool:
    """True for a diffusers UNet2DConditionModel or a pipeline holding one as `.unet` (checked by name)."""
    return is_class(model, "UNet2DConditionModel") or is_class(getattr(model, "unet", None), "UNet2DConditionModel")


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
