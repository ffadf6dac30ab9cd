"""Pieces shared by the DDIM and PLMS samplers: schedule tables, guided model calls and the DDIM update."""
import numpy as np
import torch

from ldm.modules.diffusionmodules.util import make_ddim_sampling_parameters, make_ddim_timesteps, noise_like


class SamplerSchedule:
    """The sampling schedule for S steps: ascending timesteps and DDIM tables indexed like them (float64)."""

    def __init__(self, model, ddim_num_steps, ddim_discretize="uniform", ddim_eta=0.0, verbose=True):
        self.ddpm_num_timesteps = model.num_timesteps
        self.ddim_timesteps = make_ddim_timesteps(ddim_discretize, ddim_num_steps, self.ddpm_num_timesteps,
                                                  verbose=verbose)
        alphas_cumprod = model.alphas_cumprod.detach().cpu().numpy().astype(np.float64)
        self.ddim_sigmas, self.ddim_alphas, self.ddim_alphas_prev = make_ddim_sampling_parameters(
            alphas_cumprod, self.ddim_timesteps, ddim_eta, verbose=verbose)
        self.ddim_sqrt_one_minus_alphas = np.sqrt(1.0 - self.ddim_alphas)
        self.alphas_cumprod = alphas_cumprod
        self.alphas_cumprod_prev = model.alphas_cumprod_prev.detach().cpu().numpy().astype(np.float64)
        self.eta = ddim_eta


def check_conditioning(conditioning, batch_size):
    """Warn like CompVis when the conditioning batch differs from batch_size."""
    if conditioning is None:
        return
    if isinstance(conditioning, dict):
        first = conditioning[list(conditioning.keys())[0]]
        while isinstance(first, list):
            first = first[0]
        count = first.shape[0]
    elif isinstance(conditioning, list):
        count = conditioning[0].shape[0]
    else:
        count = conditioning.shape[0]
    if count != batch_size:
        print(f"Warning: Got {count} conditionings but batch-size is {batch_size}")


def concat_conditioning(unconditional, conditional):
    """Stack [unconditional; conditional] along the batch, for tensors, lists of tensors and dicts of lists."""
    if isinstance(conditional, dict):
        return {k: concat_conditioning(unconditional[k], conditional[k]) for k in conditional}
    if isinstance(conditional, list):
        return [torch.cat([u, c]) for u, c in zip(unconditional, conditional)]
    return torch.cat([unconditional, conditional])


def guided_model_output(model, x, t, c, unconditional_guidance_scale=1.0, unconditional_conditioning=None):
    """One denoiser evaluation with classifier-free guidance: batch [uncond; cond], e = e_u + s (e_c - e_u)."""
    if unconditional_conditioning is None or unconditional_guidance_scale == 1.0:
        model.notify_sampling("model_call_started", False)
        return model.apply_model(x, t, c)
    model.notify_sampling("model_call_started", True)
    x_in = torch.cat([x] * 2)
    t_in = torch.cat([t] * 2)
    c_in = concat_conditioning(unconditional_conditioning, c)
    model_uncond, model_cond = model.apply_model(x_in, t_in, c_in).chunk(2)
    return model_uncond + unconditional_guidance_scale * (model_cond - model_uncond)


def eps_from_output(model, x, t, model_output):
    """Turn the denoiser output into a noise prediction (v-parameterized models predict v)."""
    if model.parameterization == "v":
        return model.predict_eps_from_z_and_v(x, t, model_output)
    if model.parameterization != "eps":
        raise NotImplementedError(f"sampling a {model.parameterization!r}-parameterized model is not supported")
    return model_output


def ddim_update(x, e_t, a_t, a_prev, sigma_t, sqrt_one_minus_at, repeat_noise=False, temperature=1.0,
                noise_dropout=0.0, quantize_denoised=False, model=None, dynamic_threshold=None, generator=None):
    """One DDIM step from x: (B, C, H, W) with noise estimate e_t. Scalars are floats. Returns (x_prev, pred_x0)."""
    b = x.shape[0]
    shape = (b, 1, 1, 1)

    def full(value):
        return torch.full(shape, float(value), device=x.device)

    a_t_, a_prev_, sigma_t_, sqrt_one_minus_at_ = full(a_t), full(a_prev), full(sigma_t), full(sqrt_one_minus_at)
    pred_x0 = (x - sqrt_one_minus_at_ * e_t) / a_t_.sqrt()
    if quantize_denoised:
        pred_x0, _, *_ = model.first_stage_model.quantize(pred_x0)
    if dynamic_threshold is not None:
        raise NotImplementedError("dynamic thresholding is not implemented")
    dir_xt = (1.0 - a_prev_ - sigma_t_ ** 2).sqrt() * e_t
    x_prev = a_prev_.sqrt() * pred_x0 + dir_xt
    if sigma_t != 0:
        noise = sigma_t_ * noise_like(x.shape, x.device, repeat_noise, generator=generator, dtype=x.dtype) * temperature
        if noise_dropout > 0.0:
            noise = torch.nn.functional.dropout(noise, p=noise_dropout)
        x_prev = x_prev + noise
    return x_prev, pred_x0
