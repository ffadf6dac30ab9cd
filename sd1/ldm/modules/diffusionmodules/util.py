"""Small building blocks shared by the UNet and the samplers (CompVis `diffusionmodules/util.py`, inference only)."""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def make_beta_schedule(schedule, n_timestep, linear_start=1e-4, linear_end=2e-2, cosine_s=8e-3):
    """Return the betas (n_timestep,) as a float64 numpy array.

    "linear" is CompVis's scaled-linear schedule: betas = linspace(sqrt(start), sqrt(end), n) ** 2.
    """
    if schedule == "linear":
        betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep, dtype=torch.float64, device="cpu") ** 2
    elif schedule == "cosine":
        steps = torch.arange(n_timestep + 1, dtype=torch.float64, device="cpu") / n_timestep + cosine_s
        alphas = torch.cos(steps / (1 + cosine_s) * np.pi / 2).pow(2)
        alphas = alphas / alphas[0]
        betas = torch.clamp(1 - alphas[1:] / alphas[:-1], min=0, max=0.999)
    elif schedule == "sqrt_linear":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64, device="cpu")
    elif schedule == "sqrt":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64, device="cpu") ** 0.5
    else:
        raise ValueError(f"schedule '{schedule}' unknown; expected linear, cosine, sqrt_linear or sqrt.")
    return betas.numpy()


def make_ddim_timesteps(ddim_discr_method, num_ddim_timesteps, num_ddpm_timesteps, verbose=True):
    """Timesteps used by DDIM/PLMS, ascending, as CompVis computes them (with its +1 offset).

    'uniform': c = T // S, steps = arange(0, T, c) + 1. When S does not divide T this yields more than S steps
    (S=7 gives 8), exactly as the original. Where the original would index past the schedule (S=3: 1000),
    the out-of-range steps are dropped instead of crashing, so S=3 gives [1, 334, 667].
    """
    if num_ddim_timesteps < 1 or num_ddim_timesteps > num_ddpm_timesteps:
        raise ValueError(
            f"the number of sampling steps must be between 1 and {num_ddpm_timesteps}, got {num_ddim_timesteps}."
        )
    if ddim_discr_method == "uniform":
        c = num_ddpm_timesteps // num_ddim_timesteps
        ddim_timesteps = np.asarray(list(range(0, num_ddpm_timesteps, c)))
    elif ddim_discr_method == "quad":
        ddim_timesteps = ((np.linspace(0, np.sqrt(num_ddpm_timesteps * 0.8), num_ddim_timesteps)) ** 2).astype(int)
    else:
        raise NotImplementedError(f'There is no ddim discretization method called "{ddim_discr_method}"')
    steps_out = ddim_timesteps + 1
    steps_out = steps_out[steps_out < num_ddpm_timesteps]
    if verbose:
        print(f"Selected timesteps for ddim sampler: {steps_out}")
    return steps_out


def make_ddim_sampling_parameters(alphacums, ddim_timesteps, eta, verbose=True):
    """Return (sigmas, alphas, alphas_prev) for the DDIM update, float64 numpy arrays indexed like ddim_timesteps."""
    alphacums = np.asarray(alphacums, dtype=np.float64)
    alphas = alphacums[ddim_timesteps]
    alphas_prev = np.asarray([alphacums[0]] + alphacums[ddim_timesteps[:-1]].tolist())
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    if verbose:
        print(f"Selected alphas for ddim sampler: a_t: {alphas}; a_(t-1): {alphas_prev}")
        print(f"For the chosen value of eta, which is {eta}, this results in the following sigma_t schedule for ddim sampler {sigmas}")
    return sigmas, alphas, alphas_prev


def extract_into_tensor(a, t, x_shape):
    """Gather a[t] for a batch of timesteps t: (B,) and reshape to broadcast against x_shape."""
    b, *_ = t.shape
    out = a.gather(-1, t)
    return out.reshape(b, *((1,) * (len(x_shape) - 1)))


def noise_like(shape, device, repeat=False, generator=None, dtype=torch.float32):
    """Standard normal noise of `shape` on `device`; `repeat` shares one draw across the batch. With a
    `generator` the draw happens on the generator's device (so a CPU generator gives the same noise for a
    model on any device) and is then moved."""
    draw_device = generator.device if generator is not None else device
    if repeat:
        noise = torch.randn((1, *shape[1:]), device=draw_device, generator=generator, dtype=dtype)
        return noise.repeat(shape[0], *((1,) * (len(shape) - 1))).to(device)
    return torch.randn(shape, device=draw_device, generator=generator, dtype=dtype).to(device)


def timestep_embedding(timesteps, dim, max_period=10000, repeat_only=False):
    """Sinusoidal timestep embedding, [cos, sin] order. timesteps: (B,) -> (B, dim) float32."""
    if repeat_only:
        return timesteps[:, None].float().expand(-1, dim).contiguous()
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def zero_module(module):
    """Zero the parameters of a module and return it."""
    for p in module.parameters():
        p.detach().zero_()
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (as CompVis) and the weights' dtype (a model
    loaded in bfloat16 or float16)."""

    def forward(self, x):
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


def normalization(channels):
    """The UNet's standard normalisation layer: GroupNorm(32, channels), eps 1e-5, in float32."""
    return GroupNorm32(32, channels)


def conv_nd(dims, *args, **kwargs):
    """A 1-, 2- or 3-D convolution."""
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    if dims == 2:
        return nn.Conv2d(*args, **kwargs)
    if dims == 3:
        return nn.Conv3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")


def linear(*args, **kwargs):
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims, *args, **kwargs):
    """A 1-, 2- or 3-D average pooling."""
    if dims == 1:
        return nn.AvgPool1d(*args, **kwargs)
    if dims == 2:
        return nn.AvgPool2d(*args, **kwargs)
    if dims == 3:
        return nn.AvgPool3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")
