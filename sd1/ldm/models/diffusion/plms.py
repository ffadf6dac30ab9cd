"""PLMS sampler (CompVis `ldm/models/diffusion/plms.py`) on the shared sampling loop, with sampling hooks.

Step 0 is a pseudo improved-Euler step that calls the model twice; steps 1, 2, 3+ use Adams-Bashforth of
order 2, 3, 4 on the raw noise predictions of the previous steps. Unlike the Stability code, the output of a
v-parameterized model is converted to eps for both calls of a step.
"""
import torch

from ldm.models.diffusion.sampling_common import (
    ScheduledSampler,
    check_conditioning,
    ddim_update,
    eps_from_output,
    guided_model_output,
)


class PLMSSampler(ScheduledSampler):
    """Pseudo linear multistep sampling (eta must be 0). Hooks as in `DDIMSampler`; both calls of the first
    step happen inside `step_started(0)`."""

    progress_desc = "PLMS Sampler"
    first_step_model_calls = 2  # the pseudo improved-Euler step
    takes_eta = False

    def make_schedule(self, ddim_num_steps, ddim_discretize="uniform", ddim_eta=0.0, verbose=True):
        if ddim_eta != 0:
            raise ValueError("ddim_eta must be 0 for PLMS")
        super().make_schedule(ddim_num_steps, ddim_discretize, ddim_eta, verbose=verbose)

    @torch.no_grad()
    def sample(self, S, batch_size, shape, conditioning=None, callback=None, normals_sequence=None,
               img_callback=None, quantize_x0=False, eta=0.0, mask=None, x0=None, temperature=1.0,
               noise_dropout=0.0, score_corrector=None, corrector_kwargs=None, verbose=True, x_T=None,
               log_every_t=100, unconditional_guidance_scale=1.0, unconditional_conditioning=None,
               dynamic_threshold=None, generator=None, disable_progress=None):
        """Sample latents of `shape` = (C, H, W). Returns (samples: (B, C, H, W), intermediates dict)."""
        if dynamic_threshold is not None:
            raise NotImplementedError("dynamic thresholding is not implemented")
        check_conditioning(conditioning, batch_size)
        self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=verbose)
        size = (batch_size, *shape)
        if verbose:
            print(f"Data shape for PLMS sampling is {size}")
        return self.plms_sampling(conditioning, size, callback=callback, img_callback=img_callback,
                                  quantize_denoised=quantize_x0, mask=mask, x0=x0, log_every_t=log_every_t,
                                  temperature=temperature, noise_dropout=noise_dropout, x_T=x_T,
                                  score_corrector=score_corrector, corrector_kwargs=corrector_kwargs,
                                  unconditional_guidance_scale=unconditional_guidance_scale,
                                  unconditional_conditioning=unconditional_conditioning, generator=generator,
                                  disable_progress=disable_progress)

    @torch.no_grad()
    def plms_sampling(self, cond, shape, x_T=None, callback=None, timesteps=None, quantize_denoised=False,
                      mask=None, x0=None, img_callback=None, log_every_t=100, temperature=1.0, noise_dropout=0.0,
                      score_corrector=None, corrector_kwargs=None, unconditional_guidance_scale=1.0,
                      unconditional_conditioning=None, generator=None, disable_progress=None):
        old_eps = []

        def step(x, ts, ts_next, index):
            x_prev, pred_x0, e_t = self.p_sample_plms(
                x, cond, ts, index=index, quantize_denoised=quantize_denoised, temperature=temperature,
                noise_dropout=noise_dropout, score_corrector=score_corrector, corrector_kwargs=corrector_kwargs,
                unconditional_guidance_scale=unconditional_guidance_scale,
                unconditional_conditioning=unconditional_conditioning, old_eps=old_eps, t_next=ts_next,
                generator=generator)
            old_eps.append(e_t)
            if len(old_eps) >= 4:
                old_eps.pop(0)
            return x_prev, pred_x0

        return self.run_loop(step, shape, x_T=x_T, timesteps=timesteps, callback=callback,
                             img_callback=img_callback, mask=mask, x0=x0, log_every_t=log_every_t,
                             generator=generator, disable_progress=disable_progress)

    @torch.no_grad()
    def p_sample_plms(self, x, c, t, index, repeat_noise=False, use_original_steps=False, quantize_denoised=False,
                      temperature=1.0, noise_dropout=0.0, score_corrector=None, corrector_kwargs=None,
                      unconditional_guidance_scale=1.0, unconditional_conditioning=None, old_eps=None, t_next=None,
                      generator=None):
        """One PLMS step. Returns (x_prev, pred_x0, e_t) where e_t is the raw noise prediction at (x, t)."""
        if use_original_steps:
            raise NotImplementedError("use_original_steps (the full 1000-step schedule) is not supported")
        old_eps = [] if old_eps is None else old_eps

        def noise_prediction(x_, t_):
            out = guided_model_output(self.model, x_, t_, c, unconditional_guidance_scale,
                                      unconditional_conditioning)
            e = eps_from_output(self.model, x_, t_, out)
            if score_corrector is not None:
                e = score_corrector.modify_score(self.model, e, x_, t_, c, **(corrector_kwargs or {}))
            return e

        table = self.step_table(index)

        def step(e):
            return ddim_update(x, e, *table, repeat_noise=repeat_noise, temperature=temperature,
                               noise_dropout=noise_dropout, quantize_denoised=quantize_denoised, model=self.model,
                               generator=generator)

        e_t = noise_prediction(x, t)
        if len(old_eps) == 0:
            x_prev, _ = step(e_t)
            e_t_next = noise_prediction(x_prev, t_next)
            e_t_prime = (e_t + e_t_next) / 2
        elif len(old_eps) == 1:
            e_t_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_t_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_t_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x_prev, pred_x0 = step(e_t_prime)
        return x_prev, pred_x0, e_t
