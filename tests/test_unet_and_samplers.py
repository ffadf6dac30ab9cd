"""Beyond the goldens: other sizes, batch sizes, non-square latents, the v2 layout, v-parameterization,
and the timestep sequences for every step count."""
import numpy as np
import pytest
import torch

from helpers import build, golden_model, tiny_unet_config
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.modules.attention import CrossAttention
from ldm.modules.diffusionmodules.util import make_ddim_timesteps
from ldm.util import seeded_random_weights


@pytest.fixture(scope="module")
def model():
    return golden_model()


def test_cross_attention_equals_explicit_softmax():
    torch.manual_seed(0)
    attn = CrossAttention(query_dim=24, context_dim=12, heads=3, dim_head=8).eval()
    x, ctx = torch.randn(2, 10, 24), torch.randn(2, 7, 12)
    with torch.no_grad():
        out = attn(x, context=ctx)
        q = attn.to_q(x).view(2, 10, 3, 8).transpose(1, 2)
        k = attn.to_k(ctx).view(2, 7, 3, 8).transpose(1, 2)
        v = attn.to_v(ctx).view(2, 7, 3, 8).transpose(1, 2)
        weights = torch.softmax(q @ k.transpose(-1, -2) * 8 ** -0.5, dim=-1)
        ref = attn.to_out((weights @ v).transpose(1, 2).reshape(2, 10, 24))
    assert torch.allclose(out, ref, atol=1e-6)


@pytest.mark.parametrize("hw", [(16, 16), (16, 24), (24, 16)])  # 8x8 would put a 1-pixel GroupNorm at the bottleneck
def test_batch_elements_are_independent_and_shapes_follow_the_latent(model, hw):
    unet = model.model.diffusion_model
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, *hw, generator=g)
    t = torch.tensor([999, 500, 1])
    ctx = torch.randn(3, 77, 16, generator=g)
    with torch.no_grad():
        batched = unet(x, t, context=ctx)
        single = torch.cat([unet(x[i:i + 1], t[i:i + 1], context=ctx[i:i + 1]) for i in range(3)])
    assert batched.shape == (3, 4, *hw)
    assert torch.allclose(batched, single, atol=1e-4)  # float32 BLAS blocking differs with the batch size


def test_v2_linear_projection_layout_equals_v1_conv_layout():
    """use_linear_in_transformer only moves the reshape around proj_in/proj_out: same function."""
    v1 = seeded_random_weights(build(tiny_unet_config()), seed=5).eval()
    v2 = build(tiny_unet_config(use_linear_in_transformer=True)).eval()
    converted = {k: (v.flatten(1) if (".proj_in." in k or ".proj_out." in k) and k.endswith("weight") else v)
                 for k, v in v1.state_dict().items()}
    v2.load_state_dict(converted, strict=True)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 16, 8, generator=g), torch.randn(2, 77, 16, generator=g)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        assert torch.allclose(v1(x, t, context=ctx), v2(x, t, context=ctx), atol=1e-5)


def test_num_head_channels_layout():
    """v2's fixed head width: 32 channels with num_head_channels 4 means 8 heads of 4, 64 channels 16 of 4."""
    unet = build(tiny_unet_config(num_heads=-1, num_head_channels=4))
    attn32 = unet.input_blocks[1][1].transformer_blocks[0].attn1
    attn64 = unet.input_blocks[7][1].transformer_blocks[0].attn1
    assert (attn32.heads, attn32.to_q.out_features // attn32.heads) == (8, 4)
    assert (attn64.heads, attn64.to_q.out_features // attn64.heads) == (16, 4)


@pytest.mark.parametrize("steps", [1, 2, 3, 7, 10, 25, 30, 50, 100, 333, 999, 1000])
def test_timesteps_follow_compvis(steps):
    ours = make_ddim_timesteps("uniform", steps, 1000, verbose=False)
    c = 1000 // steps
    compvis = np.arange(0, 1000, c) + 1  # CompVis; it indexes alphas_cumprod[1000] when the last entry is 1000
    assert ours.tolist() == [t for t in compvis.tolist() if t < 1000]
    assert len(ours) >= steps or compvis[-1] >= 1000


def test_uneven_step_counts_run_more_steps():
    assert len(make_ddim_timesteps("uniform", 7, 1000, verbose=False)) == 8
    assert make_ddim_timesteps("uniform", 3, 1000, verbose=False).tolist() == [1, 334, 667]
    with pytest.raises(ValueError, match="between 1 and 1000"):
        make_ddim_timesteps("uniform", 0, 1000, verbose=False)


class VelocityUNet(torch.nn.Module):
    """Wraps an eps UNet so that it predicts v = sqrt(a) eps - sqrt(1 - a) x0 instead.

    With x_t = sqrt(a) x0 + sqrt(1 - a) eps this is v = (eps - sqrt(1 - a) x_t) / sqrt(a).
    """

    def __init__(self, unet, alphas_cumprod):
        super().__init__()
        self.unet = unet
        self.register_buffer("alphas_cumprod", alphas_cumprod)

    def forward(self, x, timesteps=None, context=None, **kwargs):
        eps = self.unet(x, timesteps, context=context)
        a = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        return (eps - (1 - a).sqrt() * x) / a.sqrt()


@pytest.mark.parametrize("sampler_class", [DDIMSampler, PLMSSampler])
def test_v_parameterization_samples_like_the_equivalent_eps_model(model, golden_io, sampler_class):
    kwargs = dict(S=4, conditioning=golden_io["sample.c"], batch_size=2, shape=[4, 16, 16],
                  unconditional_guidance_scale=7.5, unconditional_conditioning=golden_io["sample.uc"],
                  x_T=golden_io["ddim.x_T"], verbose=False, disable_progress=True)
    eps_samples, _ = sampler_class(model).sample(**kwargs)
    unet = model.model.diffusion_model
    try:
        model.model.diffusion_model = VelocityUNet(unet, model.alphas_cumprod)
        model.parameterization = "v"
        v_samples, _ = sampler_class(model).sample(**kwargs)
    finally:
        model.model.diffusion_model = unet
        model.parameterization = "eps"
    assert (v_samples - eps_samples).abs().max() < 1e-3


def test_plms_rejects_eta(model):
    with pytest.raises(ValueError, match="eta must be 0"):
        PLMSSampler(model).sample(S=2, batch_size=1, shape=[4, 8, 8], conditioning=None, eta=0.5, verbose=False)


def test_ddim_eta_uses_the_given_generator(model, golden_io):
    kwargs = dict(S=3, conditioning=golden_io["sample.c"], batch_size=2, shape=[4, 8, 8], eta=1.0,
                  x_T=golden_io["ddim.x_T"][:, :, :8, :8], verbose=False, disable_progress=True)
    a, _ = DDIMSampler(model).sample(generator=torch.Generator().manual_seed(0), **kwargs)
    b, _ = DDIMSampler(model).sample(generator=torch.Generator().manual_seed(0), **kwargs)
    c, _ = DDIMSampler(model).sample(generator=torch.Generator().manual_seed(1), **kwargs)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_bfloat16_autocast_stays_close(model, golden_io):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.apply_model(golden_io["unet.x"], golden_io["unet.t"], golden_io["unet.context"])
    ref = golden_io["unet.out"]
    assert out.shape == ref.shape
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()
