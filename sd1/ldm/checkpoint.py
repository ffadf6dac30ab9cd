"""Reading Stable Diffusion checkpoints (.ckpt / .safetensors) offline and fitting them to a model.

Every failure is a `CheckpointError` with one message that says what was wrong and what to do.
"""
import os
import pickle
import re
import zipfile
from collections import OrderedDict

import torch

TEXT_MODEL_ANCHOR = "transformer."  # a transformers CLIPTextModel sits at `...transformer.` (SD 1.x, SDXL)
TEXT_MODEL_LEVEL = "text_model."
EMA_PREFIX = "model_ema."
UNET_PREFIX = "model.diffusion_model."
IGNORED_SUFFIXES = ("embeddings.position_ids",)
# Buffers the model computes from its config (sgm's DiscreteDenoiser sigmas): a checkpoint may leave them out.
COMPUTED_KEYS = ("denoiser.sigmas",)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not fit the model config."""


class _InertStandIn:
    """Takes the place of the few plain objects real SD checkpoints pickle besides tensors (a Lightning
    `ModelCheckpoint` callback, numpy scalars and dtypes): it accepts any arguments and state and does
    nothing, so loading them runs no code from the file. The loader keeps only the tensors anyway."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


# The complete allow-list, beyond torch's own weights-only set (tensors, storages, dtypes, OrderedDict):
# single names that released Stable Diffusion .ckpt files contain, each mapped to the inert stand-in.
# Never a whole package: `numpy.*` or `torch.*` include functions that execute code.
CHECKPOINT_STAND_INS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.dtype",
)


def read_checkpoint(path):
    """Return the flat state dict {name: tensor} stored in a .ckpt or .safetensors file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(
            f"checkpoint not found: {path}. Put the Stable Diffusion weights there, pass --ckpt PATH, "
            f"or run with --demo to use the built-in tiny model with random weights."
        )
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint path {path} is a directory; give the .ckpt or .safetensors file.")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); the download or copy did not finish.")
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    return _read_torch_checkpoint(path)


def _read_safetensors(path):
    from safetensors.torch import load_file

    try:
        return dict(load_file(path, device="cpu"))
    except Exception as err:
        raise CheckpointError(
            f"could not read {path} as safetensors ({type(err).__name__}: {err}). The file is truncated or "
            f"is not a safetensors file; download it again."
        ) from None


def _read_torch_checkpoint(path):
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(2)
        if head[:1] != b"\x80":
            raise CheckpointError(
                f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle). Give a .ckpt saved by "
                f"torch.save or a .safetensors file."
            )
    stand_ins = [(_InertStandIn, name) for name in CHECKPOINT_STAND_INS]
    try:
        with torch.serialization.safe_globals(stand_ins):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if _is_refused_object(err):
            raise CheckpointError(_refusal(path, err)) from None
        raise CheckpointError(
            f"could not read {path} ({type(err).__name__}: {err}). The file is truncated or corrupt; "
            f"download it again."
        ) from None
    except (zipfile.BadZipFile, EOFError, RuntimeError) as err:
        raise CheckpointError(
            f"could not read {path} ({type(err).__name__}: {err}). The file is truncated or corrupt; "
            f"download it again."
        ) from None
    except Exception as err:
        raise CheckpointError(f"could not read {path} ({type(err).__name__}: {err}).") from None
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not any(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors; it is not a model checkpoint.")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def _is_refused_object(err: Exception) -> bool:
    """True when torch's weights-only unpickler stopped at a global it does not allow (not a broken file)."""
    text = str(err).lower()
    return any(word in text for word in ("global", "allowlist", "unrecognized function", "can only"))


def _refusal(path, err: Exception) -> str:
    """The message for a .ckpt that pickles something beyond tensors and the allow-list."""
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    what = f"the object `{found.group(1)}`" if found else f"an object torch will not load safely ({err})"
    return (f"refused to load {path}: it pickles {what}, which a Stable Diffusion checkpoint does not need and "
            f"which could run code when unpickled, so nothing of it was loaded. Use a .safetensors file "
            f"of the same model, or convert this one only where you trust where it came from.")


def select_ema_weights(state_dict):
    """Replace the UNet weights by their `model_ema.*` copies (CompVis LitEma naming: dots removed).

    Returns (state_dict, used) where used says whether EMA weights existed.
    """
    ema = {k[len(EMA_PREFIX):]: v for k, v in state_dict.items() if k.startswith(EMA_PREFIX)}
    if not ema:
        return state_dict, False
    out = {}
    for key, value in state_dict.items():
        if key.startswith(EMA_PREFIX):
            continue
        if key.startswith("model."):
            ema_key = key[len("model."):].replace(".", "")
            if ema_key in ema:
                value = ema[ema_key]
        out[key] = value
    return out, True


def fit_text_encoder_names(state_dict, model_keys):
    """Map transformers-4 text-encoder names (`...transformer.text_model.X`) to what the model expects.

    transformers 5 dropped the `text_model.` level inside CLIPTextModel; real SD 1.x and SDXL checkpoints have it
    (`cond_stage_model.transformer.text_model.*`, `conditioner.embedders.0.transformer.text_model.*`). The mapping
    works in both directions, so either transformers version loads either naming; a key is only renamed when the
    new name is one the model has.
    """
    out = {}
    for key, value in state_dict.items():
        if key not in model_keys:
            head, anchor, rest = key.partition(TEXT_MODEL_ANCHOR)
            if anchor:
                if rest.startswith(TEXT_MODEL_LEVEL):
                    candidate = head + anchor + rest[len(TEXT_MODEL_LEVEL):]
                else:
                    candidate = head + anchor + TEXT_MODEL_LEVEL + rest
                if candidate in model_keys:
                    key = candidate
        out[key] = value
    return out


def _shape(t):
    return list(t.shape)


def fit_state_dict(model, state_dict, use_ema=False, path="checkpoint"):
    """Check a checkpoint against `model` and return (state_dict ready for load_state_dict, notes).

    Raises CheckpointError naming the missing keys or the differing shapes when it does not fit.
    """
    notes = []
    expected = model.state_dict()
    model_has_ema = any(k.startswith(EMA_PREFIX) for k in expected)
    if use_ema and not model_has_ema:
        state_dict, used = select_ema_weights(state_dict)
        notes.append("using the EMA weights (model_ema.*)" if used else
                     "--ema asked for EMA weights but the checkpoint has none; using its ordinary weights")
    if not model_has_ema:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(EMA_PREFIX)}
    state_dict = fit_text_encoder_names(state_dict, expected.keys())
    state_dict = {k: v for k, v in state_dict.items()
                  if k in expected or not k.endswith(IGNORED_SUFFIXES)}
    if not any(k.startswith(UNET_PREFIX) for k in state_dict):
        raise CheckpointError(
            f"{path} has no '{UNET_PREFIX}*' weights: it is not a CompVis/Stability latent-diffusion checkpoint "
            f"(a diffusers folder, a LoRA or a VAE-only file cannot be loaded with this config)."
        )
    mismatched = [(k, _shape(v), _shape(expected[k])) for k, v in state_dict.items()
                  if k in expected and _shape(v) != _shape(expected[k])]
    missing = [k for k in expected if k not in state_dict and k not in COMPUTED_KEYS]
    unexpected = [k for k in state_dict if k not in expected]
    if mismatched or missing:
        lines = [f"{path} does not fit the model config:"]
        if mismatched:
            lines.append(f"  {len(mismatched)} tensors have other shapes, e.g.")
            lines += [f"    {k}: checkpoint {a} vs config {b}" for k, a, b in mismatched[:5]]
        if missing:
            lines.append(f"  {len(missing)} tensors the config needs are missing, e.g. " + ", ".join(missing[:5]))
        if unexpected:
            lines.append(f"  {len(unexpected)} checkpoint tensors the config does not have, e.g. "
                         + ", ".join(unexpected[:5]))
        lines.append("  " + _config_hint(state_dict))
        raise CheckpointError("\n".join(lines))
    if unexpected:
        notes.append(f"ignoring {len(unexpected)} checkpoint tensors the config does not use, e.g. "
                     + ", ".join(unexpected[:3]))
    return {k: v for k, v in state_dict.items() if k in expected}, notes


def _config_hint(state_dict):
    """Guess which config fits a checkpoint, from its cross-attention width."""
    for key, value in state_dict.items():
        if key.endswith("attn2.to_k.weight") and key.startswith(UNET_PREFIX):
            width = value.shape[1]
            if width == 768:
                return "The checkpoint is SD 1.x (context width 768): use configs/stable-diffusion/v1-inference.yaml."
            if width == 1024:
                return ("The checkpoint is SD 2.x (context width 1024): use configs/stable-diffusion/"
                        "v2-inference.yaml (or v2-inference-v.yaml for the 768-v models).")
            if width == 2048:
                return "The checkpoint is SDXL base (context width 2048): use configs/stable-diffusion/sd_xl_base.yaml."
            return f"The checkpoint's cross-attention context width is {width}; pick the config that matches it."
    return "Pick the config file that belongs to this checkpoint."


def load_state_dict_into(model, checkpoint, use_ema=False, ignore_keys=(), verbose=False, assign=False,
                         dtype=None):
    """Load a checkpoint path (or an already read state dict) into `model`, strictly, after fitting names.

    assign: put the checkpoint tensors into the model instead of copying them (for a model whose parameters
    were built on the meta device, see `ldm.util.empty_parameters`; peak memory stays near one copy of the
    weights). Floating-point parameters are converted to `dtype` (default: the dtype the model was built
    with) one tensor at a time; buffers keep the model's dtype. With assign, a state dict passed in is emptied
    (its tensors move into the model), so that no second reference keeps converted tensors alive. A key of
    COMPUTED_KEYS that the checkpoint lacks keeps the model's own value.
    """
    is_path = isinstance(checkpoint, (str, os.PathLike))
    path = checkpoint if is_path else "checkpoint"
    source = read_checkpoint(checkpoint) if is_path else checkpoint
    state_dict = OrderedDict((k, v) for k, v in source.items()
                             if not any(k.startswith(prefix) for prefix in ignore_keys))
    if assign or is_path:
        source.clear()
    fitted, notes = fit_state_dict(model, state_dict, use_ema=use_ema, path=os.fspath(path))
    state_dict.clear()
    if assign:
        fitted = _converted_for_assignment(model, fitted, dtype)
    missing, unexpected = model.load_state_dict(fitted, strict=False, assign=assign)
    fitted.clear()
    not_computed = [k for k in missing if k not in COMPUTED_KEYS]
    if not_computed or unexpected:
        raise CheckpointError(f"{path} did not load completely: missing {not_computed[:5]}, "
                              f"unexpected {unexpected[:5]}")
    if missing:
        notes.append(f"{', '.join(missing)} not in the checkpoint; computed from the config")
    on_meta = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if on_meta:
        raise CheckpointError(f"{path} left {len(on_meta)} tensors of the model without values, e.g. "
                              + ", ".join(on_meta[:5]))
    if verbose:
        for note in notes:
            print(note)
    return notes


def _converted_for_assignment(model, fitted, dtype):
    """The fitted tensors in the dtypes the model should hold, converted (and released) one at a time.

    Parameters take `dtype` (or the model's own parameter dtype) when floating-point; buffers take the
    dtype of the model's buffer, so schedule tables stay float32 whatever the weights are stored in.
    """
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    out = OrderedDict()
    for key in list(fitted):
        value = fitted.pop(key)
        own = params.get(key, buffers.get(key))
        if own is not None and value.is_floating_point():
            target = dtype if (dtype is not None and key in params) else own.dtype
            value = value.to(target)
        out[key] = value
    return out
