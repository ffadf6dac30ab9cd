"""CompVis' `UNetModel` whose first convolution also sees two coordinate channels (the shapes model's UNet).

SD's UNet has no positional encoding: its attention queries know where they are only through the zero padding of
the convolutions, which at high noise carries almost nothing. Here the first convolution (`input_blocks.0.0`, the
same key) reads the latent and a row and a column coordinate, each in [-1, 1] over the latent grid (CoordConv,
Liu et al. 2018); everything else, and every block the methods patch, is CompVis' own. The coordinate weights
start at zero, so the model starts as the plain UNet (and draws the same random numbers to build); the training's
first diffusion phase holds them there (`hold_coordinates`), its layout phases train them (shapesworld.train).
Not part of CompVis' code.
"""
from __future__ import annotations

import torch
from torch import nn

from ldm.modules.diffusionmodules.openaimodel import UNetModel

COORDINATE_CHANNELS = 2


def coordinates(batch: int, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """Row and column coordinates in [-1, 1]: (batch, 2, height, width), dtype and device of `like`."""
    rows = torch.linspace(-1.0, 1.0, height, dtype=like.dtype, device=like.device)
    cols = torch.linspace(-1.0, 1.0, width, dtype=like.dtype, device=like.device)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"))
    return grid.unsqueeze(0).expand(batch, -1, -1, -1)


class CoordConv2d(nn.Conv2d):
    """A 3 x 3 convolution of (x, coordinates): x (B, C, H, W) -> (B, out_channels, H, W); its weight is
    (out_channels, C + 2, 3, 3), the last two input channels the row and column coordinates."""

    def __init__(self, conv: nn.Conv2d) -> None:
        """The convolution `conv` (C -> out_channels, 3 x 3, padding 1) with zero weights for the coordinates."""
        with torch.random.fork_rng(devices=[]):
            super().__init__(conv.in_channels + COORDINATE_CHANNELS, conv.out_channels, 3, padding=1,
                             bias=conv.bias is not None)
        with torch.no_grad():
            self.weight.zero_()
            self.weight[:, : conv.in_channels].copy_(conv.weight)
            if conv.bias is not None:
                self.bias.copy_(conv.bias)

    @property
    def latent_channels(self) -> int:
        return self.in_channels - COORDINATE_CHANNELS

    def hold_coordinates(self) -> None:
        """Zero the coordinate weights' gradient (after backward): an optimizer step then leaves them as they are
        (AdamW too: zero moments give a zero update, and decay keeps a zero weight zero)."""
        if self.weight.grad is not None:
            self.weight.grad[:, self.latent_channels:] = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        return self._conv_forward(torch.cat([x, coordinates(b, h, w, x)], dim=1), self.weight, self.bias)


class CoordUNetModel(UNetModel):
    """`UNetModel` (same arguments, same keys, same random draws) with `input_blocks.0.0` a `CoordConv2d`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        first = self.input_blocks[0][0]
        if not isinstance(first, nn.Conv2d) or first.kernel_size != (3, 3):
            raise ValueError("CoordUNetModel needs a 2-d UNet whose first layer is a 3 x 3 convolution")
        self.input_blocks[0][0] = CoordConv2d(first)
