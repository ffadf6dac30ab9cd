"""Inference-only CompVis first-stage models: the KL autoencoder (the Stable Diffusion VAE) and the identity stage.

Training pieces of CompVis (pytorch-lightning, the loss, optimisers, logging) are left out; their constructor
arguments are still accepted so that CompVis configs build unchanged.
"""
import pickle

import torch
import torch.nn as nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution


def _load_checkpoint_state_dict(path):
    """Read a ``.safetensors`` file or a torch checkpoint (its ``state_dict`` entry if present) on the CPU."""
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # pickles holding arbitrary objects are refused by weights_only=True
        raise RuntimeError(
            f"Could not read {path} with torch.load(weights_only=True): {err}. Expected a checkpoint holding only "
            "tensors (and plain containers). Convert it to .safetensors, or load it yourself and call "
            "load_state_dict."
        ) from err
    return ckpt.get("state_dict", ckpt)


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder: image (B, 3, H, W) <-> latent (B, embed_dim, H/f, W/f), f = 2**(len(ch_mult)-1).

    Submodules (checkpoint names): ``encoder``, ``decoder``, ``quant_conv`` (1x1, 2*z_channels -> 2*embed_dim),
    ``post_quant_conv`` (1x1, embed_dim -> z_channels). ``lossconfig``, ``image_key`` and ``monitor`` are accepted
    and ignored (no loss at inference).
    """

    def __init__(self, ddconfig, lossconfig=None, embed_dim=None, ckpt_path=None, ignore_keys=(), image_key="image",
                 colorize_nlabels=None, monitor=None, **ignore_kwargs):
        super().__init__()
        if embed_dim is None:
            raise TypeError("AutoencoderKL needs embed_dim (the latent channel count; 4 for Stable Diffusion).")
        if not ddconfig["double_z"]:
            raise ValueError("AutoencoderKL needs ddconfig.double_z = true (the encoder must output mean and logvar).")
        self.image_key = image_key
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        z_channels = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.embed_dim = embed_dim
        if colorize_nlabels is not None:
            assert isinstance(colorize_nlabels, int)
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))
        if monitor is not None:
            self.monitor = monitor
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)

    def init_from_ckpt(self, path, ignore_keys=()):
        """Load weights from a VAE checkpoint (non-strict: loss.* and similar extra keys are dropped).

        Keys that start with any of ``ignore_keys`` are skipped. A full LatentDiffusion checkpoint also works: its
        ``first_stage_model.*`` entries are used.
        """
        sd = _load_checkpoint_state_dict(path)
        prefix = "first_stage_model."
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        sd = {k: v for k, v in sd.items() if not any(k.startswith(ik) for ik in ignore_keys)}
        missing, unexpected = self.load_state_dict(sd, strict=False)
        print(f"Restored AutoencoderKL from {path}: {len(missing)} missing, {len(unexpected)} unexpected keys")
        if missing:
            print(f"Missing keys: {missing}")
        return missing, unexpected

    def encode(self, x):
        """x: (B, in_channels, H, W) in [-1, 1] -> posterior over latents (B, embed_dim, H/f, W/f)."""
        h = self.encoder(x)
        moments = self.quant_conv(h)
        return DiagonalGaussianDistribution(moments)

    def decode(self, z):
        """z: (B, embed_dim, h, w) (unscaled, i.e. before scale_factor) -> image (B, out_ch, h*f, w*f)."""
        z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, input, sample_posterior=True):
        """input: (B, in_channels, H, W) -> (reconstruction (B, out_ch, H, W), posterior)."""
        posterior = self.encode(input)
        z = posterior.sample() if sample_posterior else posterior.mode()
        dec = self.decode(z)
        return dec, posterior

    @torch.no_grad()
    def to_rgb(self, x):
        """Project a segmentation-like (B, colorize_nlabels, H, W) map to 3 channels in [-1, 1] (CompVis helper)."""
        if not hasattr(self, "colorize"):
            self.register_buffer("colorize", torch.randn(3, x.shape[1], 1, 1).to(x))
        x = torch.nn.functional.conv2d(x, weight=self.colorize)
        return 2.0 * (x - x.min()) / (x.max() - x.min()) - 1.0


class IdentityFirstStage(nn.Module):
    """A first stage that does nothing: encode, decode, quantize and forward return their input unchanged."""

    def __init__(self, *args, vq_interface=False, **kwargs):
        super().__init__()
        self.vq_interface = vq_interface

    def encode(self, x, *args, **kwargs):
        return x

    def decode(self, x, *args, **kwargs):
        return x

    def quantize(self, x, *args, **kwargs):
        if self.vq_interface:
            return x, None, [None, None, None]
        return x

    def forward(self, x, *args, **kwargs):
        return x
