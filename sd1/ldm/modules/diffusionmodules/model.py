"""Convolutional encoder/decoder of the CompVis KL autoencoder (the Stable Diffusion VAE).

Module and attribute names follow CompVis ``ldm/modules/diffusionmodules/model.py`` exactly, because they are
the checkpoint keys (``first_stage_model.encoder.down.1.block.0.nin_shortcut.weight`` ...). Inference only.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def nonlinearity(x):
    """Swish / SiLU: ``x * sigmoid(x)``, any shape."""
    return x * torch.sigmoid(x)


def Normalize(in_channels, num_groups=32):
    """GroupNorm with 32 groups, eps 1e-6 and affine weights (the VAE's only normalisation)."""
    return nn.GroupNorm(num_groups=num_groups, num_channels=in_channels, eps=1e-6, affine=True)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling, optionally followed by a 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, in_channels, with_conv):
        super().__init__()
        self.with_conv = with_conv
        if self.with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.with_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    """x2 downsampling: (B, C, H, W) -> (B, C, H//2, W//2) for even H, W.

    With a conv: zero-pad right and bottom by one pixel, then a 3x3 stride-2 conv without padding (note: the UNet's
    Downsample pads symmetrically instead). Without: 2x2 average pooling.
    """

    def __init__(self, in_channels, with_conv):
        super().__init__()
        self.with_conv = with_conv
        if self.with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x):
        if self.with_conv:
            x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0)
            return self.conv(x)
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (B, C_in, H, W) [+ temb (B, T)] -> (B, C_out, H, W).

    ``temb_proj`` exists only when ``temb_channels > 0`` (the VAE uses 0). When C_in != C_out the skip path is a
    1x1 ``nin_shortcut`` (or a 3x3 ``conv_shortcut`` when ``conv_shortcut=True``).
    """

    def __init__(self, *, in_channels, out_channels=None, conv_shortcut=False, dropout, temb_channels=512):
        super().__init__()
        self.in_channels = in_channels
        out_channels = in_channels if out_channels is None else out_channels
        self.out_channels = out_channels
        self.use_conv_shortcut = conv_shortcut

        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if temb_channels > 0:
            self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if self.in_channels != self.out_channels:
            if self.use_conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x, temb=None):
        h = self.conv1(nonlinearity(self.norm1(x)))
        if temb is not None:
            h = h + self.temb_proj(nonlinearity(temb))[:, :, None, None]
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a residual: (B, C, H, W) -> (B, C, H, W).

    Tokens are the H*W positions, head dim = C, scale C**-0.5. Computed with
    ``F.scaled_dot_product_attention`` so that large inputs can use a memory-efficient kernel.
    """

    def __init__(self, in_channels):
        super().__init__()
        self.in_channels = in_channels
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x):
        h_ = self.norm(x)
        q, k, v = self.q(h_), self.k(h_), self.v(h_)
        b, c, h, w = q.shape
        # (B, C, H, W) -> (B, 1, H*W, C): one head over H*W tokens
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(2, 3) for t in (q, k, v))
        h_ = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        h_ = h_.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(h_)


class LinAttnBlock(nn.Module):
    """Linear attention (one head, head dim = C) as used by ``attn_type="linear"``: (B, C, H, W) -> (B, C, H, W).

    Same parameters (``to_qkv`` without bias, ``to_out``) as CompVis ``LinearAttention(dim=C, heads=1, dim_head=C)``.
    No residual connection, as in CompVis.
    """

    def __init__(self, in_channels):
        super().__init__()
        self.heads = 1
        self.to_qkv = nn.Conv2d(in_channels, in_channels * 3, kernel_size=1, bias=False)
        self.to_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.to_qkv(x).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)  # (B, heads, d, N)
        k = k.softmax(dim=-1)
        context = torch.einsum("bhdn,bhen->bhde", k, v)
        out = torch.einsum("bhde,bhdn->bhen", context, q)
        return self.to_out(out.reshape(b, c, h, w))


def make_attn(in_channels, attn_type="vanilla"):
    """Attention block factory: "vanilla" -> AttnBlock, "linear" -> LinAttnBlock, "none" -> Identity.

    "vanilla-xformers" (the SD 2.x / SDXL configs) is the same block: AttnBlock already uses torch's fused attention.
    """
    if attn_type in ("vanilla", "vanilla-xformers"):
        return AttnBlock(in_channels)
    if attn_type == "linear":
        return LinAttnBlock(in_channels)
    if attn_type == "none":
        return nn.Identity()
    raise ValueError(f"attn_type {attn_type!r} unknown; "
                     f"expected one of 'vanilla', 'vanilla-xformers', 'linear', 'none'.")


class Encoder(nn.Module):
    """VAE encoder: image (B, in_channels, H, W) -> moments (B, 2*z_channels or z_channels, H/f, W/f),
    f = 2**(len(ch_mult)-1). ``out_ch`` is accepted (shared ddconfig) and unused."""

    def __init__(self, *, ch, out_ch, ch_mult=(1, 2, 4, 8), num_res_blocks, attn_resolutions, dropout=0.0,
                 resamp_with_conv=True, in_channels, resolution, z_channels, double_z=True, use_linear_attn=False,
                 attn_type="vanilla", **ignore_kwargs):
        super().__init__()
        if use_linear_attn:
            attn_type = "linear"
        self.ch = ch
        self.temb_ch = 0
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels

        self.conv_in = nn.Conv2d(in_channels, self.ch, kernel_size=3, stride=1, padding=1)

        curr_res = resolution
        in_ch_mult = (1,) + tuple(ch_mult)
        self.in_ch_mult = in_ch_mult
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block = nn.ModuleList()
            attn = nn.ModuleList()
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            for _ in range(self.num_res_blocks):
                block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, temb_channels=self.temb_ch,
                                         dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(make_attn(block_in, attn_type=attn_type))
            down = nn.Module()
            down.block = block
            down.attn = attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, resamp_with_conv)
                curr_res = curr_res // 2
            self.down.append(down)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, temb_channels=self.temb_ch,
                                       dropout=dropout)
        self.mid.attn_1 = make_attn(block_in, attn_type=attn_type)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, temb_channels=self.temb_ch,
                                       dropout=dropout)

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, stride=1,
                                  padding=1)

    def forward(self, x):
        """x: (B, in_channels, H, W), H and W divisible by f -> (B, 2*z_channels, H/f, W/f)."""
        temb = None
        h = self.conv_in(x)
        for i_level in range(self.num_resolutions):
            level = self.down[i_level]
            for i_block in range(self.num_res_blocks):
                h = level.block[i_block](h, temb)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = level.downsample(h)

        h = self.mid.block_1(h, temb)
        h = self.mid.attn_1(h)
        h = self.mid.block_2(h, temb)

        h = self.conv_out(nonlinearity(self.norm_out(h)))
        return h


class Decoder(nn.Module):
    """VAE decoder: latent (B, z_channels, h, w) -> image (B, out_ch, h*f, w*f), f = 2**(len(ch_mult)-1).

    Each level has ``num_res_blocks + 1`` ResnetBlocks. ``in_channels`` and ``double_z`` are accepted (shared
    ddconfig) and unused.
    """

    def __init__(self, *, ch, out_ch, ch_mult=(1, 2, 4, 8), num_res_blocks, attn_resolutions, dropout=0.0,
                 resamp_with_conv=True, in_channels, resolution, z_channels, give_pre_end=False, tanh_out=False,
                 use_linear_attn=False, attn_type="vanilla", **ignorekwargs):
        super().__init__()
        if use_linear_attn:
            attn_type = "linear"
        self.ch = ch
        self.temb_ch = 0
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels
        self.give_pre_end = give_pre_end
        self.tanh_out = tanh_out

        block_in = ch * ch_mult[self.num_resolutions - 1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.z_shape = (1, z_channels, curr_res, curr_res)

        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, temb_channels=self.temb_ch,
                                       dropout=dropout)
        self.mid.attn_1 = make_attn(block_in, attn_type=attn_type)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, temb_channels=self.temb_ch,
                                       dropout=dropout)

        # built from the lowest resolution up, stored so that up[i] is the level with ch_mult[i]
        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block = nn.ModuleList()
            attn = nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(self.num_res_blocks + 1):
                block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, temb_channels=self.temb_ch,
                                         dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(make_attn(block_in, attn_type=attn_type))
            up = nn.Module()
            up.block = block
            up.attn = attn
            if i_level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                curr_res = curr_res * 2
            self.up.insert(0, up)

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z):
        """z: (B, z_channels, h, w) -> (B, out_ch, h*f, w*f) (or the pre-norm features if ``give_pre_end``)."""
        self.last_z_shape = z.shape
        temb = None
        h = self.conv_in(z)

        h = self.mid.block_1(h, temb)
        h = self.mid.attn_1(h)
        h = self.mid.block_2(h, temb)

        for i_level in reversed(range(self.num_resolutions)):
            level = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = level.block[i_block](h, temb)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != 0:
                h = level.upsample(h)

        if self.give_pre_end:
            return h
        h = self.conv_out(nonlinearity(self.norm_out(h)))
        if self.tanh_out:
            h = torch.tanh(h)
        return h
