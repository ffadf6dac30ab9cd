"""The SDXL UNet (generative-models `openaimodel.UNetModel`): the CompVis UNet of `ldm` with sgm's signature.

The architecture is the same openaimodel design (same module names, so SDXL checkpoints load strictly):
per-level `transformer_depth`, `num_classes: sequential` with `adm_in_channels` (the vector y of size and
pooled-text conditioning, through `label_emb`, added to the time embedding), Linear proj_in/proj_out. With
the SDXL base config: input_blocks 0..8, middle_block, output_blocks 0..8; attention only at the 2x and 4x
downsampled levels (64x64 and 32x32 tokens at 1024x1024).

forward(x: (B, C, H, W), timesteps: (B,), context: (B, M, context_dim), y: (B, adm_in_channels)) -> (B, C_out, H, W)
"""
import torch
import torch.nn as nn

from ldm.modules.diffusionmodules.openaimodel import UNetModel as CompVisUNetModel
from ldm.modules.diffusionmodules.util import timestep_embedding

ATTENTION_TYPES = ("softmax", "softmax-xformers")  # both run torch's scaled_dot_product_attention here


class Timestep(nn.Module):
    """Sinusoidal embedding of (B,) numbers -> (B, dim), [cos, sin] order (no parameters)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(t, self.dim)


class UNetModel(CompVisUNetModel):
    """generative-models' UNetModel constructor on the shared CompVis implementation (spatial transformers,
    head width or head count as configured)."""

    def __init__(self, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                 dropout=0.0, channel_mult=(1, 2, 4, 8), conv_resample=True, dims=2, num_classes=None,
                 use_checkpoint=False, num_heads=-1, num_head_channels=-1, num_heads_upsample=-1,
                 use_scale_shift_norm=False, resblock_updown=False, transformer_depth=1, context_dim=None,
                 disable_self_attentions=None, num_attention_blocks=None, disable_middle_self_attn=False,
                 use_linear_in_transformer=False, spatial_transformer_attn_type="softmax", adm_in_channels=None):
        if spatial_transformer_attn_type not in ATTENTION_TYPES:
            raise ValueError(f"spatial_transformer_attn_type must be one of {ATTENTION_TYPES}, "
                             f"got {spatial_transformer_attn_type!r}")
        super().__init__(
            image_size=None, in_channels=in_channels, model_channels=model_channels, out_channels=out_channels,
            num_res_blocks=num_res_blocks, attention_resolutions=attention_resolutions, dropout=dropout,
            channel_mult=channel_mult, conv_resample=conv_resample, dims=dims, num_classes=num_classes,
            use_checkpoint=use_checkpoint, num_heads=num_heads, num_head_channels=num_head_channels,
            num_heads_upsample=num_heads_upsample, use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown, use_spatial_transformer=True, transformer_depth=transformer_depth,
            context_dim=context_dim, legacy=False, disable_self_attentions=disable_self_attentions,
            num_attention_blocks=num_attention_blocks, disable_middle_self_attn=disable_middle_self_attn,
            use_linear_in_transformer=use_linear_in_transformer, adm_in_channels=adm_in_channels)
