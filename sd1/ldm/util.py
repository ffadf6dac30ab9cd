"""Config instantiation and checkpoint loading in the CompVis manner."""
import importlib
from contextlib import contextmanager


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


@contextmanager
def empty_parameters():
    """Inside the block, every parameter a module registers lives on the meta device (no memory, no values);
    buffers stay real, so what a model computes from its config (schedules, masks, position ids) is kept.

    Used to build a model whose weights then come from a checkpoint by assignment
    (`ldm.checkpoint.load_state_dict_into(..., assign=True)`), so loading needs about one copy of the
    weights instead of two. It swaps `torch.nn.Module.register_parameter` for the duration of the block
    (in every thread of the process) and restores it on exit.
    """
    import torch

    register = torch.nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None:
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def load_model_from_config(config, ckpt=None, device="cpu", use_ema=False, verbose=False, dtype=None):
    """Build `config.model` and load the checkpoint `ckpt` (.ckpt or .safetensors) into it, in eval mode.

    With a checkpoint the parameters are built empty (meta device) and the checkpoint's tensors are assigned,
    so peak memory stays near one copy of the weights. `dtype` (e.g. torch.bfloat16) keeps the parameters in
    that dtype; the default is the dtype the config builds (float32). Text-encoder names are fitted to the
    installed transformers, `position_ids` is ignored, and `use_ema` takes the `model_ema.*` weights when the
    checkpoint has them. A checkpoint that does not fit the config raises `ldm.checkpoint.CheckpointError`
    naming the difference. Works for CompVis/Stability configs (`ldm.*`) and generative-models configs
    (`sgm.*`, e.g. SDXL) alike.
    """
    from ldm.checkpoint import load_state_dict_into, read_checkpoint

    model_config = config.model if "model" in config else config
    if ckpt is None:
        model = instantiate_from_config(model_config)
        if dtype is not None:
            model = model.to(dtype)
    else:
        state_dict = read_checkpoint(ckpt)
        with empty_parameters():
            model = instantiate_from_config(model_config)
        load_state_dict_into(model, state_dict, use_ema=use_ema, verbose=verbose, assign=True, dtype=dtype)
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
