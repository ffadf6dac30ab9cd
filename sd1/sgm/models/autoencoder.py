"""The SDXL first stage (`sgm.models.autoencoder.AutoencoderKL`): the KL autoencoder of `ldm` (same modules and
checkpoint names) with sgm's interface, where `encode` returns a latent sample instead of the posterior."""
from typing import Dict, Tuple, Union

import torch

from ldm.models.autoencoder import AutoencoderKL as CompVisAutoencoderKL


class AutoencoderKL(CompVisAutoencoderKL):
    """image (B, 3, H, W) in [-1, 1] <-> latent (B, embed_dim, H/8, W/8) (unscaled: scale_factor is the engine's).

    `lossconfig` / `loss_config`, `monitor` and other training arguments are accepted and ignored.
    """

    def __init__(self, embed_dim, ddconfig, lossconfig=None, loss_config=None, ckpt_path=None, **kwargs):
        super().__init__(ddconfig=ddconfig, lossconfig=lossconfig or loss_config, embed_dim=embed_dim,
                         ckpt_path=ckpt_path, **kwargs)

    def encode(self, x: torch.Tensor, return_reg_log: bool = False
               ) -> Union[torch.Tensor, Tuple[torch.Tensor, Dict[str, torch.Tensor]]]:
        """x: (B, 3, H, W) -> a sample of the posterior (B, embed_dim, H/8, W/8) (global RNG, as upstream);
        with return_reg_log also {"kl_loss": the batch-mean KL}."""
        posterior = super().encode(x)
        z = posterior.sample()
        if return_reg_log:
            return z, {"kl_loss": posterior.kl().sum() / z.shape[0]}
        return z
