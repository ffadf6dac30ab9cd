"""sgm: the inference subset of Stability-AI generative-models (SDXL), with its module paths, class names and
call signatures, so that its configs (`configs/inference/sd_xl_base.yaml`) build unchanged.

Everything that is the same as in CompVis latent diffusion is shared with `ldm` (UNet, transformer blocks,
VAE, text towers, checkpoint loading); this package adds what SDXL does differently: the conditioner with
its size conditioning, the EDM-style denoiser and samplers, and the DiffusionEngine that holds them.
"""
