"""The SD UNet (CompVis `openaimodel.UNetModel`, inference only, spatial-transformer variant).

Block layout for SD 1.x (see tests/data/README.md): input_blocks[0..11], middle_block, output_blocks[0..11], out.
Output block j consumes the skip of input block 11 - j.
"""
from abc import abstractmethod

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.util import (
    avg_pool_nd,
    conv_nd,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    @abstractmethod
    def forward(self, x, emb):
        """x: (B, C, H, W); emb: (B, E)."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """A sequential module that passes the timestep embedding and the context to the children that take them."""

    def forward(self, x, emb, context=None):
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling, then an optional 3x3 convolution."""

    def __init__(self, channels, use_conv, dims=2, out_channels=None, padding=1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=padding)

    def forward(self, x):
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.use_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    """Stride-2 3x3 convolution (padding 1), or average pooling when use_conv is False."""

    def __init__(self, channels, use_conv, dims=2, out_channels=None, padding=1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=padding)
        else:
            if self.channels != self.out_channels:
                raise ValueError("average-pool downsampling cannot change the channel count")
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x):
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding. x: (B, C, H, W), emb: (B, E) -> (B, C_out, H', W')."""

    def __init__(self, channels, emb_channels, dropout, out_channels=None, use_conv=False,
                 use_scale_shift_norm=False, dims=2, use_checkpoint=False, up=False, down=False):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x, emb):
        if self.updown:
            in_rest, in_conv = self.in_layers[:-1], self.in_layers[-1]
            h = in_rest(x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = in_conv(h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        while len(emb_out.shape) < len(h.shape):
            emb_out = emb_out[..., None]
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = out_norm(h) * (1 + scale) + shift
            h = out_rest(h)
        else:
            h = h + emb_out
            h = self.out_layers(h)
        return self.skip_connection(x) + h


class UNetModel(nn.Module):
    """The latent-diffusion UNet with spatial transformers.

    forward(x: (B, in_channels, H, W), timesteps: (B,), context: (B, M, context_dim)) -> (B, out_channels, H, W).
    H and W must be multiples of 2 ** (len(channel_mult) - 1) (8 for SD).

    Attention layout: v1 configs fix the head count (`num_heads`), v2 configs the head width (`num_head_channels`)
    and use Linear proj_in/proj_out (`use_linear_in_transformer`). `use_fp16` is accepted for config
    compatibility but casts nothing: precision is chosen at run time with torch.autocast, so a float32 model
    on CPU works with a v2 config unchanged.

    `transformer_depth` is one int for every SpatialTransformer, or one per channel_mult level (SDXL: [1, 2, 10]);
    the middle block then takes the deepest level's. `num_classes`: an int (class labels y: (B,)), "continuous"
    (y: (B, 1)) or "sequential" (SDXL: y: (B, adm_in_channels) through Linear-SiLU-Linear); `label_emb(y)` is
    added to the time embedding.
    """

    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                 dropout=0, channel_mult=(1, 2, 4, 8), conv_resample=True, dims=2, num_classes=None,
                 use_checkpoint=False, use_fp16=False, num_heads=-1, num_head_channels=-1, num_heads_upsample=-1,
                 use_scale_shift_norm=False, resblock_updown=False, use_new_attention_order=False,
                 use_spatial_transformer=False, transformer_depth=1, context_dim=None, n_embed=None, legacy=True,
                 disable_self_attentions=None, num_attention_blocks=None, disable_middle_self_attn=False,
                 use_linear_in_transformer=False, adm_in_channels=None):
        super().__init__()
        if not use_spatial_transformer:
            raise NotImplementedError(
                "only the spatial-transformer UNet of Stable Diffusion is implemented (use_spatial_transformer: True)"
            )
        if context_dim is None:
            raise ValueError("use_spatial_transformer needs context_dim (the text-embedding width)")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("either num_heads or num_head_channels has to be set")
        if n_embed is not None:
            raise NotImplementedError("n_embed (codebook prediction) is not supported by this inference UNet")
        if hasattr(context_dim, "__iter__") and not isinstance(context_dim, int):
            context_dim = list(context_dim)[0]
        if isinstance(num_res_blocks, int):
            self.num_res_blocks = len(channel_mult) * [num_res_blocks]
        else:
            if len(num_res_blocks) != len(channel_mult):
                raise ValueError("num_res_blocks must be an int or have one entry per channel_mult level")
            self.num_res_blocks = list(num_res_blocks)
        if isinstance(transformer_depth, int):
            transformer_depth = len(channel_mult) * [transformer_depth]
        elif len(transformer_depth) != len(channel_mult):
            raise ValueError("transformer_depth must be an int or have one entry per channel_mult level")
        transformer_depth = list(transformer_depth)
        if disable_self_attentions is not None and len(disable_self_attentions) != len(channel_mult):
            raise ValueError("disable_self_attentions needs one entry per channel_mult level")
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample
        self.predict_codebook_ids = False

        def attention_shape(ch):
            """(heads, dim_head) at a block with ch channels, following the v1/v2 config convention."""
            if num_head_channels == -1:
                heads, dim_head = num_heads, ch // num_heads
            else:
                heads, dim_head = ch // num_head_channels, num_head_channels
            if legacy:
                dim_head = ch // heads
            return heads, dim_head

        def block_has_attention(level, nr):
            return num_attention_blocks is None or nr < num_attention_blocks[level]

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim),
            nn.SiLU(),
            linear(time_embed_dim, time_embed_dim),
        )
        if num_classes is not None:
            if isinstance(num_classes, int):
                self.label_emb = nn.Embedding(num_classes, time_embed_dim)
            elif num_classes == "continuous":
                self.label_emb = nn.Linear(1, time_embed_dim)
            elif num_classes == "sequential":
                if adm_in_channels is None:
                    raise ValueError("num_classes 'sequential' needs adm_in_channels (the width of the vector y)")
                self.label_emb = nn.Sequential(nn.Sequential(
                    linear(adm_in_channels, time_embed_dim),
                    nn.SiLU(),
                    linear(time_embed_dim, time_embed_dim),
                ))
            else:
                raise ValueError(f"num_classes must be an int, 'continuous' or 'sequential', got {num_classes!r}")

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))]
        )
        input_block_chans = [model_channels]
        ch = model_channels
        ds = 1
        for level, mult in enumerate(channel_mult):
            for nr in range(self.num_res_blocks[level]):
                layers = [ResBlock(ch, time_embed_dim, dropout, out_channels=mult * model_channels, dims=dims,
                                   use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm)]
                ch = mult * model_channels
                if ds in attention_resolutions and block_has_attention(level, nr):
                    heads, dim_head = attention_shape(ch)
                    disabled_sa = disable_self_attentions[level] if disable_self_attentions is not None else False
                    layers.append(SpatialTransformer(ch, heads, dim_head, depth=transformer_depth[level],
                                                     context_dim=context_dim, disable_self_attn=disabled_sa,
                                                     use_linear=use_linear_in_transformer,
                                                     use_checkpoint=use_checkpoint))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                out_ch = ch
                if resblock_updown:
                    down = ResBlock(ch, time_embed_dim, dropout, out_channels=out_ch, dims=dims,
                                    use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm,
                                    down=True)
                else:
                    down = Downsample(ch, conv_resample, dims=dims, out_channels=out_ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                ch = out_ch
                input_block_chans.append(ch)
                ds *= 2

        heads, dim_head = attention_shape(ch)
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, time_embed_dim, dropout, dims=dims, use_checkpoint=use_checkpoint,
                     use_scale_shift_norm=use_scale_shift_norm),
            SpatialTransformer(ch, heads, dim_head, depth=transformer_depth[-1], context_dim=context_dim,
                               disable_self_attn=disable_middle_self_attn, use_linear=use_linear_in_transformer,
                               use_checkpoint=use_checkpoint),
            ResBlock(ch, time_embed_dim, dropout, dims=dims, use_checkpoint=use_checkpoint,
                     use_scale_shift_norm=use_scale_shift_norm),
        )

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(self.num_res_blocks[level] + 1):
                ich = input_block_chans.pop()
                layers = [ResBlock(ch + ich, time_embed_dim, dropout, out_channels=model_channels * mult, dims=dims,
                                   use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm)]
                ch = model_channels * mult
                if ds in attention_resolutions and block_has_attention(level, i):
                    heads, dim_head = attention_shape(ch)
                    disabled_sa = disable_self_attentions[level] if disable_self_attentions is not None else False
                    layers.append(SpatialTransformer(ch, heads, dim_head, depth=transformer_depth[level],
                                                     context_dim=context_dim, disable_self_attn=disabled_sa,
                                                     use_linear=use_linear_in_transformer,
                                                     use_checkpoint=use_checkpoint))
                if level and i == self.num_res_blocks[level]:
                    out_ch = ch
                    if resblock_updown:
                        layers.append(ResBlock(ch, time_embed_dim, dropout, out_channels=out_ch, dims=dims,
                                               use_checkpoint=use_checkpoint,
                                               use_scale_shift_norm=use_scale_shift_norm, up=True))
                    else:
                        layers.append(Upsample(ch, conv_resample, dims=dims, out_channels=out_ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1)),
        )

    def embed_time(self, timesteps, y=None):
        """timesteps: (B,), y: the labels or vector (B, ...) of a class-conditional UNet -> the embedding
        (B, 4 * model_channels) every ResBlock receives."""
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels, repeat_only=False))
        if self.num_classes is not None:
            if y is None or y.shape[0] != timesteps.shape[0]:
                raise ValueError(f"a class-conditional UNet (num_classes {self.num_classes!r}) needs y with one "
                                 f"row per timestep, got {None if y is None else tuple(y.shape)}")
            emb = emb + self.label_emb(y)
        return emb

    def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
        """x: (B, C, H, W); timesteps: (B,); context: (B, M, D) -> (B, out_channels, H, W)."""
        emb = self.embed_time(timesteps, y)
        hs = []
        h = x
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)
            h = module(h, emb, context)
        return self.out(h)
