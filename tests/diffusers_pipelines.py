"""Tiny diffusers pipelines for the tests (random weights, built from configs as diffusers' own tests do)."""
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import GOLDEN_CONFIG, GOLDEN_WEIGHTS
from ldm.util import seeded_random_weights

GOLDEN_IMAGE_SIZE = 128  # the golden VAE downsamples 8x: 16 x 16 latents
SDXL_LATENT = 16  # the tiny SDXL VAE downsamples 2x: 32 x 32 images


def golden_pipeline():
    """The golden tiny SD 1.x checkpoint as a StableDiffusionPipeline (diffusers' conversion, CompVis DDIM)."""
    from sdgen.diffusers_models import pipeline_from_ldm

    return pipeline_from_ldm(OmegaConf.load(str(GOLDEN_CONFIG)), load_file(str(GOLDEN_WEIGHTS)),
                             image_size=GOLDEN_IMAGE_SIZE)


def tiny_sdxl_pipeline(seed=0):
    """A StableDiffusionXLPipeline with SDXL's layout: three levels, no attention at the highest resolution, two
    transformer blocks per attention at the lowest, text_time added conditioning, two CLIP text encoders."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdgen.diffusers_models import clip_tokenizer

    unet = diffusers.UNet2DConditionModel(
        sample_size=SDXL_LATENT, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                           "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4), use_linear_projection=True,
        cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=8)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=2 * SDXL_LATENT)
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, hidden_act="gelu", projection_dim=32, bos_token_id=49406,
                eos_token_id=49407, pad_token_id=1)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text))
    for i, module in enumerate((unet, vae, text_encoder, text_encoder_2)):
        seeded_random_weights(module, seed=seed + i)
    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 timestep_spacing="leading", steps_offset=1)
    tokenizer = clip_tokenizer()
    pipe = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                               tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                               scheduler=scheduler, force_zeros_for_empty_prompt=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
