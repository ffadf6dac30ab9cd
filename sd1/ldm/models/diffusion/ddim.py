"""DDIM sampler (CompVis `ldm/models/diffusion/ddim.py`) on the shared sampling loop, with sampling hooks."""
import numpy as np
import torch

from ldm.models.diffusion.sampling_common import (
    ScheduledSampler,
    check_conditioning,
    ddim_update,
    eps_from_output,
    guided_model_output,
)


class DDIMSampler(ScheduledSampler):
    """Deterministic (eta 0) or stochastic DDIM sampling of a LatentDiffusion model.

    Every run is announced to `model.sampling_hooks` (`ldm.models.diffusion.hooks`): the run, each step
    (i = 0 is the noisiest) and each UNet call.
    """

    progress_desc = "DDIM Sampler"

    @torch.no_grad()
    def sample(self, S, batch_size, shape, conditioning=None, callback=None, normals_sequence=None,
               img_callback=None, quantize_x0=False, eta=0.0, mask=None, x0=None, temperature=1.0,
               noise_dropout=0.0, score_corrector=None, corrector_kwargs=None, verbose=True, x_T=None,
               log_every_t=100, unconditional_guidance_scale=1.0, unconditional_conditioning=None,
               dynamic_threshold=None, ucg_schedule=None, generator=None, disable_progress=None):
        """Sample latents of `shape` = (C, H, W). Returns (samples: (B, C, H, W), intermediates dict).

        generator: source of the start noise (when x_T is None) and of the eta noise; None uses the global RNG.
        """
        if ucg_schedule is not None:
            raise NotImplementedError("ucg_schedule (a per-step guidance scale) is not supported")
        check_conditioning(conditioning, batch_size)
        self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=verbose)
        size = (batch_size, *shape)
        if verbose:
            print(f"Data shape for DDIM sampling is {size}, eta {eta}")
        return self.ddim_sampling(conditioning, size, callback=callback, img_callback=img_callback,
                                  quantize_denoised=quantize_x0, mask=mask, x0=x0, log_every_t=log_every_t,
                                  temperature=temperature, noise_dropout=noise_dropout, x_T=x_T,
                                  score_corrector=score_corrector, corrector_kwargs=corrector_kwargs,
                                  unconditional_guidance_scale=unconditional_guidance_scale,
                                  unconditional_conditioning=unconditional_conditioning,
                                  dynamic_threshold=dynamic_threshold, generator=generator,
                                  disable_progress=disable_progress)

    @torch.no_grad()
    def ddim_sampling(self, cond, shape, x_T=None, callback=None, timesteps=None, quantize_denoised=False,
                      mask=None, x0=None, img_callback=None, log_every_t=100, temperature=1.0, noise_dropout=0.0,
                      score_corrector=None, corrector_kwargs=None, unconditional_guidance_scale=1.0,
                      unconditional_conditioning=None, dynamic_threshold=None, generator=None,
                      disable_progress=None):
        def step(x, ts, ts_next, index):
            return self.p_sample_ddim(x, cond, ts, index=index, quantize_denoised=quantize_denoised,
                                      temperature=temperature, noise_dropout=noise_dropout,
                                      score_corrector=score_corrector, corrector_kwargs=corrector_kwargs,
                                      unconditional_guidance_scale=unconditional_guidance_scale,
                                      unconditional_conditioning=unconditional_conditioning,
                                      dynamic_threshold=dynamic_threshold, generator=generator)

        return self.run_loop(step, shape, x_T=x_T, timesteps=timesteps, callback=callback,
                             img_callback=img_callback, mask=mask, x0=x0, log_every_t=log_every_t,
                             generator=generator, disable_progress=disable_progress)

    @torch.no_grad()
    def p_sample_ddim(self, x, c, t, index, repeat_noise=False, use_original_steps=False, quantize_denoised=False,
                      temperature=1.0, noise_dropout=0.0, score_corrector=None, corrector_kwargs=None,
                      unconditional_guidance_scale=1.0, unconditional_conditioning=None, dynamic_threshold=None,
                      generator=None):
        """One DDIM step at table index `index` (ascending order). Returns (x_prev, pred_x0)."""
        if use_original_steps:
            raise NotImplementedError("use_original_steps (the full 1000-step schedule) is not supported")
        model_output = guided_model_output(self.model, x, t, c, unconditional_guidance_scale,
                                           unconditional_conditioning)
        e_t = eps_from_output(self.model, x, t, model_output)
        if score_corrector is not None:
            e_t = score_corrector.modify_score(self.model, e_t, x, t, c, **(corrector_kwargs or {}))
        return ddim_update(x, e_t, *self.step_table(index), repeat_noise=repeat_noise,
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
               use_original_steps=False, callback=None, disable_progress=None, generator=None):
        """Denoise x_latent from DDIM step index t_start down to 0 (img2img). Returns (B, C, H, W)."""
        def step(x, ts, ts_next, index):
            return self.p_sample_ddim(x, cond, ts, index=index, use_original_steps=use_original_steps,
                                      unconditional_guidance_scale=unconditional_guidance_scale,
                                      unconditional_conditioning=unconditional_conditioning, generator=generator)

        x_dec, _ = self.run_loop(step, x_latent.shape, x_T=x_latent, timesteps=t_start, callback=callback,
                                 disable_progress=disable_progress, desc="Decoding image")
        return x_dec
