"""DDIM sampler (CompVis `ldm/models/diffusion/ddim.py`), with step hooks for feature-caching patches."""
import numpy as np
import torch
from tqdm import tqdm

from ldm.models.diffusion.sampling_common import (
    SamplerSchedule,
    check_conditioning,
    ddim_update,
    eps_from_output,
    guided_model_output,
)


class DDIMSampler:
    """Deterministic (eta 0) or stochastic DDIM sampling of a LatentDiffusion model.

    Every run announces itself to `model.sampling_hooks`: `sampling_started(num_steps)` before the first step,
    `step_started(i)` before step i (i = 0 is the noisiest), `sampling_finished()` at the end.
    """

    def __init__(self, model, schedule="linear", device=None, **kwargs):
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
        from ldm.modules.diffusionmodules.util import make_ddim_timesteps

        return len(make_ddim_timesteps(ddim_discretize, S, self.ddpm_num_timesteps, verbose=False))

    @torch.no_grad()
    def sample(self, S, batch_size, shape, conditioning=None, callback=None, normals_sequence=None,
               img_callback=None, quantize_x0=False, eta=0.0, mask=None, x0=None, temperature=1.0,
               noise_dropout=0.0, score_corrector=None, corrector_kwargs=None, verbose=True, x_T=None,
               log_every_t=100, unconditional_guidance_scale=1.0, unconditional_conditioning=None,
               dynamic_threshold=None, ucg_schedule=None, generator=None, disable_progress=None, **kwargs):
        """Sample latents of `shape` = (C, H, W). Returns (samples: (B, C, H, W), intermediates dict)."""
        check_conditioning(conditioning, batch_size)
        self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=verbose)
        size = (batch_size, *shape)
        if verbose:
            print(f"Data shape for DDIM sampling is {size}, eta {eta}")
        return self.ddim_sampling(conditioning, size, callback=callback, img_callback=img_callback,
                                  quantize_denoised=quantize_x0, mask=mask, x0=x0, log_every_t=log_every_t,
                                  temperature=temperature, noise_dropout=noise_dropout, x_T=x_T,
                                  unconditional_guidance_scale=unconditional_guidance_scale,
                                  unconditional_conditioning=unconditional_conditioning,
                                  dynamic_threshold=dynamic_threshold, generator=generator,
                                  disable_progress=disable_progress)

    def _step_table(self, index, use_original_steps):
        if use_original_steps:
            raise NotImplementedError("use_original_steps (the full 1000-step schedule) is not supported")
        return (self.ddim_alphas[index], self.ddim_alphas_prev[index], self.ddim_sigmas[index],
                self.ddim_sqrt_one_minus_alphas[index])

    @torch.no_grad()
    def ddim_sampling(self, cond, shape, x_T=None, callback=None, timesteps=None, quantize_denoised=False,
                      mask=None, x0=None, img_callback=None, log_every_t=100, temperature=1.0, noise_dropout=0.0,
                      unconditional_guidance_scale=1.0, unconditional_conditioning=None, dynamic_threshold=None,
                      generator=None, disable_progress=None):
        device = self.model.betas.device
        b = shape[0]
        img = torch.randn(shape, device=device, generator=generator) if x_T is None else x_T
        timesteps = self.ddim_timesteps if timesteps is None else self.ddim_timesteps[:timesteps]
        intermediates = {"x_inter": [img], "pred_x0": [img]}
        time_range = np.flip(timesteps)
        total_steps = timesteps.shape[0]
        self.model.notify_sampling("sampling_started", total_steps)
        try:
            iterator = tqdm(time_range, desc="DDIM Sampler", total=total_steps, disable=disable_progress)
            for i, step in enumerate(iterator):
                index = total_steps - i - 1
                ts = torch.full((b,), int(step), device=device, dtype=torch.long)
                if mask is not None:
                    img_orig = self.model.q_sample(x0, ts)
                    img = img_orig * mask + (1.0 - mask) * img
                self.model.notify_sampling("step_started", i)
                img, pred_x0 = self.p_sample_ddim(img, cond, ts, index=index, quantize_denoised=quantize_denoised,
                                                  temperature=temperature, noise_dropout=noise_dropout,
                                                  unconditional_guidance_scale=unconditional_guidance_scale,
                                                  unconditional_conditioning=unconditional_conditioning,
                                                  dynamic_threshold=dynamic_threshold, generator=generator)
                if callback:
                    callback(i)
                if img_callback:
                    img_callback(pred_x0, i)
                if index % log_every_t == 0 or index == total_steps - 1:
                    intermediates["x_inter"].append(img)
                    intermediates["pred_x0"].append(pred_x0)
        finally:
            self.model.notify_sampling("sampling_finished")
        return img, intermediates

    @torch.no_grad()
    def p_sample_ddim(self, x, c, t, index, repeat_noise=False, use_original_steps=False, quantize_denoised=False,
                      temperature=1.0, noise_dropout=0.0, score_corrector=None, corrector_kwargs=None,
                      unconditional_guidance_scale=1.0, unconditional_conditioning=None, dynamic_threshold=None,
                      generator=None):
        """One DDIM step at table index `index` (ascending order). Returns (x_prev, pred_x0)."""
        model_output = guided_model_output(self.model, x, t, c, unconditional_guidance_scale,
                                           unconditional_conditioning)
        e_t = eps_from_output(self.model, x, t, model_output)
        if score_corrector is not None:
            e_t = score_corrector.modify_score(self.model, e_t, x, t, c, **(corrector_kwargs or {}))
        a_t, a_prev, sigma_t, sqrt_one_minus_at = self._step_table(index, use_original_steps)
        return ddim_update(x, e_t, a_t, a_prev, sigma_t, sqrt_one_minus_at, repeat_noise=repeat_noise,
                           temperature=temperature, noise_dropout=noise_dropout,
                           quantize_denoised=quantize_denoised, model=self.model,
                           dynamic_threshold=dynamic_threshold, generator=generator)

    @torch.no_grad()
    def stochastic_encode(self, x0, t, use_original_steps=False, noise=None, generator=None):
        """Noise the scaled latent x0: (B, C, H, W) to DDIM step index t: (B,) (for img2img)."""
        if use_original_steps:
            sqrt_alphas_cumprod = np.sqrt(self.table.alphas_cumprod)
            sqrt_one_minus = np.sqrt(1.0 - self.table.alphas_cumprod)
        else:
            sqrt_alphas_cumprod = np.sqrt(self.ddim_alphas)
            sqrt_one_minus = self.ddim_sqrt_one_minus_alphas
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
        idx = t.detach().cpu().numpy()
        a = torch.tensor(sqrt_alphas_cumprod[idx], dtype=torch.float32, device=x0.device).view(-1, 1, 1, 1)
        s = torch.tensor(sqrt_one_minus[idx], dtype=torch.float32, device=x0.device).view(-1, 1, 1, 1)
        return a * x0 + s * noise

    @torch.no_grad()
    def decode(self, x_latent, cond, t_start, unconditional_guidance_scale=1.0, unconditional_conditioning=None,
               use_original_steps=False, callback=None, disable_progress=None):
        """Denoise x_latent from DDIM step index t_start down to 0 (img2img). Returns (B, C, H, W)."""
        timesteps = self.ddim_timesteps[:t_start]
        time_range = np.flip(timesteps)
        total_steps = timesteps.shape[0]
        x_dec = x_latent
        self.model.notify_sampling("sampling_started", total_steps)
        try:
            iterator = tqdm(time_range, desc="Decoding image", total=total_steps, disable=disable_progress)
            for i, step in enumerate(iterator):
                index = total_steps - i - 1
                ts = torch.full((x_latent.shape[0],), int(step), device=x_latent.device, dtype=torch.long)
                self.model.notify_sampling("step_started", i)
                x_dec, _ = self.p_sample_ddim(x_dec, cond, ts, index=index, use_original_steps=use_original_steps,
                                              unconditional_guidance_scale=unconditional_guidance_scale,
                                              unconditional_conditioning=unconditional_conditioning)
                if callback:
                    callback(i)
        finally:
            self.model.notify_sampling("sampling_finished")
        return x_dec
