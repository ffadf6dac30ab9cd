"""What the DDIM and PLMS samplers share: the schedule tables, one sampling loop (with the sampling hooks),
guided model calls and the DDIM update."""
import numpy as np
import torch
from tqdm import tqdm

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
        model.sampling_hooks.model_call(False)
        return model.apply_model(x, t, c)
    model.sampling_hooks.model_call(True)
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


class ScheduledSampler:
    """Base of the CompVis samplers: the schedule on a model's DDPM timesteps and the one sampling loop.

    Subclasses implement `_step(x, ts, i, index, ...)` and keep CompVis's public `sample(...)` front.
    The loop announces the run, each step and (through `guided_model_output`) each UNet call to
    `model.sampling_hooks` (see `ldm.models.diffusion.hooks`).
    """

    progress_desc = "Sampler"
    first_step_model_calls = 1  # UNet calls (each with the whole CFG batch) in step 0; one in every later step
    takes_eta = True  # whether eta > 0 (stochastic sampling) is defined

    def __init__(self, model, schedule="linear", device=None):
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps
        self.schedule = schedule
        self.device = device
        self.table = None

    def make_schedule(self, ddim_num_steps, ddim_discretize="uniform", ddim_eta=0.0, verbose=True):
        self.table = SamplerSchedule(self.model, ddim_num_steps, ddim_discretize, ddim_eta, verbose=verbose)
        self.ddim_timesteps = self.table.ddim_timesteps
        self.ddim_alphas = self.table.ddim_alphas
        self.ddim_alphas_prev = self.table.ddim_alphas_prev
        self.ddim_sigmas = self.table.ddim_sigmas
        self.ddim_sqrt_one_minus_alphas = self.table.ddim_sqrt_one_minus_alphas

    def num_steps(self, S, ddim_discretize="uniform"):
        """How many steps `sample(S=...)` will really run (more than S when S does not divide 1000)."""
        return len(make_ddim_timesteps(ddim_discretize, S, self.ddpm_num_timesteps, verbose=False))

    def step_table(self, index):
        """(alpha_t, alpha_prev, sigma_t, sqrt(1 - alpha_t)) of table index `index` (ascending order)."""
        return (self.ddim_alphas[index], self.ddim_alphas_prev[index], self.ddim_sigmas[index],
                self.ddim_sqrt_one_minus_alphas[index])

    def run_loop(self, step, shape, x_T=None, timesteps=None, callback=None, img_callback=None, mask=None,
                 x0=None, log_every_t=100, generator=None, disable_progress=None, desc=None):
        """The sampling loop: from x_T (or fresh noise of `shape`) over the first `timesteps` table entries,
        newest first. `step(x, ts, ts_next, index)` returns (x_prev, pred_x0) for one step; `ts` and `ts_next`
        are (B,) timesteps of this step and the next one (the last step's own for the last). Returns
        (x_0: (B, C, H, W), intermediates dict with 'x_inter' and 'pred_x0' lists)."""
        device = self.model.betas.device
        b = shape[0]
        img = torch.randn(shape, device=device, generator=generator) if x_T is None else x_T
        timesteps = self.ddim_timesteps if timesteps is None else self.ddim_timesteps[:timesteps]
        intermediates = {"x_inter": [img], "pred_x0": [img]}
        time_range = list(np.flip(timesteps))
        total_steps = len(time_range)
        with self.model.sampling_hooks.run(total_steps) as hooks:
            iterator = tqdm(time_range, desc=desc or self.progress_desc, total=total_steps, disable=disable_progress)
            for i, t in enumerate(iterator):
                index = total_steps - i - 1
                ts = torch.full((b,), int(t), device=device, dtype=torch.long)
                ts_next = torch.full((b,), int(time_range[min(i + 1, total_steps - 1)]), device=device,
                                     dtype=torch.long)
                if mask is not None:
                    img_orig = self.model.q_sample(x0, ts)
                    img = img_orig * mask + (1.0 - mask) * img
                hooks.step_started(i)
                img, pred_x0 = step(img, ts, ts_next, index)
                if callback:
                    callback(i)
                if img_callback:
                    img_callback(pred_x0, i)
                if index % log_every_t == 0 or index == total_steps - 1:
                    intermediates["x_inter"].append(img)
                    intermediates["pred_x0"].append(pred_x0)
        return img, intermediates
