"""The network wrapper of DiffusionEngine.model: routes the conditioning dict to the UNet (`sgm` wrappers)."""
from typing import Dict

import torch
import torch.nn as nn

OPENAIUNETWRAPPER = "sgm.modules.diffusionmodules.wrappers.OpenAIWrapper"


class IdentityWrapper(nn.Module):
    """Holds the UNet as `diffusion_model` (the checkpoint prefix `model.diffusion_model.`)."""

    def __init__(self, diffusion_model: nn.Module, compile_model: bool = False):
        super().__init__()
        if compile_model:
            raise ValueError("compile_model is not supported: compile the UNet yourself after patching it "
                             "(datosd and tomesd patch model.diffusion_model in place)")
        self.diffusion_model = diffusion_model

    def forward(self, *args, **kwargs):
        return self.diffusion_model(*args, **kwargs)


class OpenAIWrapper(IdentityWrapper):
    """x: (B, C, H, W), t: (B,), c: {"crossattn": (B, M, D), "vector": (B, V), "concat": (B, C', H, W)} -> UNet."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: Dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
        if "concat" in c:
            x = torch.cat((x, c["concat"]), dim=1)
        return self.diffusion_model(x, timesteps=t, context=c.get("crossattn"), y=c.get("vector"), **kwargs)
