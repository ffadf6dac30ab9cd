"""Config instantiation and checkpoint loading in the CompVis manner."""
import importlib


def get_obj_from_str(string, reload=False):
    """Return the object named by a dotted path such as ``ldm.models.autoencoder.AutoencoderKL``."""
    module, cls = string.rsplit(".", 1)
    if reload:
        importlib.reload(importlib.import_module(module))
    return getattr(importlib.import_module(module, package=None), cls)


def instantiate_from_config(config):
    """Build ``config.target(**config.params)``; the CompVis placeholders build nothing."""
    if "target" not in config:
        if config == "__is_first_stage__" or config == "__is_unconditional__":
            return None
        raise KeyError("Expected key `target` to instantiate.")
    return get_obj_from_str(config["target"])(**config.get("params", dict()))


def load_model_from_config(config, ckpt=None, device="cpu", use_ema=False, verbose=False):
    """Build `config.model` and load the checkpoint `ckpt` (.ckpt or .safetensors) into it, in eval mode.

    Text-encoder names are fitted to the installed transformers, `position_ids` is ignored, and `use_ema`
    takes the `model_ema.*` weights when the checkpoint has them. A checkpoint that does not fit the config
    raises `ldm.checkpoint.CheckpointError` naming the difference.
    """
    from ldm.checkpoint import load_state_dict_into, read_checkpoint

    model_config = config.model if "model" in config else config
    state_dict = read_checkpoint(ckpt) if ckpt is not None else None
    model = instantiate_from_config(model_config)
    if state_dict is not None:
        load_state_dict_into(model, state_dict, use_ema=use_ema, verbose=verbose)
        if verbose:
            print(f"Loaded {ckpt}")
    return model.to(device).eval()


def seeded_random_weights(model, seed=0):
    """Redraw every parameter from a seeded generator so no output is trivially zero (demo and tests).

    Norm weights 1 + 0.1 N(0, 1); 1-D parameters 0.05 N(0, 1); embeddings 0.02 N(0, 1);
    other weights N(0, min(0.1, 1 / sqrt(fan_in))) -- the rule the golden tiny model was drawn with.
    """
    import math

    import torch

    generator = torch.Generator().manual_seed(seed)
    norm_types = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    norm_weights = {f"{name}.weight" if name else "weight" for name, module in model.named_modules()
                    if isinstance(module, norm_types)}
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if name in norm_weights:
                value = 1.0 + 0.1 * noise
            elif param.ndim <= 1:
                value = 0.05 * noise
            elif "embedding" in name:
                value = 0.02 * noise
            else:
                fan_in = param.numel() // param.shape[0]
                value = min(0.1, 1.0 / math.sqrt(fan_in)) * noise
            param.copy_(value.to(param.dtype))
    return model
