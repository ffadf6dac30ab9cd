"""The shapes world: the generator, the captions, the judge, training from scratch and the exported checkpoint."""
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from shapesworld.data import scene_batch
from shapesworld.evaluate import one_object_prompts, prompt_accuracy, reference_images, two_object_prompts
from shapesworld.export import compvis_state_dict, write_checkpoint
from shapesworld.judge import accuracy, classify_shape, components, detect, judge
from shapesworld.judge import CHROMA_MIN
from shapesworld.train import (OBJECT_CHROMA, STATE_FILE, TrainSettings, Trainer, build_model, diffusion_loss, lr_at,
                               min_snr_weights)
from ldm.modules.diffusionmodules.coordconv import CoordConv2d, CoordUNetModel, coordinates
from shapesworld.world import (BACKGROUNDS, COLORS, POSITIONS, SHAPES, Scene, ShapeObject, WorldConfig, canonical_caption,
                               background_image, caption, parse_caption, render, sample_scene)
from sdgen.resources import SHAPES_CONFIG


def scenes_and_images(seed, count, world=WorldConfig()):
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, world) for _ in range(count)]
    return scenes, [render(s, rng, world.image_size) for s in scenes]


# --- the generator ---------------------------------------------------------------------------------------------
def test_batches_are_a_function_of_seed_and_index():
    a, b = scene_batch(3, 7, 16), scene_batch(3, 7, 16)
    assert torch.equal(a.images, b.images) and a.captions == b.captions and a.scenes == b.scenes
    c = scene_batch(4, 7, 16)
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (16, 3, 64, 64) and a.images.min() >= -1 and a.images.max() <= 1


def test_scenes_cover_the_world_and_keep_objects_apart():
    scenes, _ = scenes_and_images(0, 2000)
    objects = [o for s in scenes for o in s.objects]
    assert {o.color for o in objects} == set(COLORS)
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.position for o in objects} == set(POSITIONS)
    two = sum(len(s.objects) == 2 for s in scenes) / len(scenes)
    assert 0.2 < two < 0.3  # WorldConfig.two_objects = 0.25
    for scene in scenes:
        assert len({o.cell for o in scene.objects}) == len(scene.objects)


def test_objects_are_drawn_in_their_cell_with_their_color():
    scene = Scene((ShapeObject("blue", "square", "bottom right", "large"),), background="white")
    image = render(scene).astype(int)
    blue = (image[..., 2] > 150) & (image[..., 0] < 120)
    rows, cols = np.nonzero(blue)
    assert rows.min() >= 2 * 64 / 3 - 1 and cols.min() >= 2 * 64 / 3 - 1
    # an exact square 0.75 of a cell wide, centered in the cell (no jitter without a generator)
    width = 0.75 * 64 / 3
    assert abs(blue.sum() - width ** 2) < 2 * width
    assert np.all(np.abs(image[0, 0] - background_image(BACKGROUNDS["white"], 64)[0, 0]) <= 1)


def test_the_background_is_neutral_lit_from_above_and_warmer_to_the_right():
    for name, color in BACKGROUNDS.items():
        image = render(Scene((ShapeObject("red", "circle", "center", "small"),), background=name)).astype(int)
        corners = {"top left": image[0, 0], "bottom left": image[-1, 0], "top right": image[0, -1]}
        assert corners["top left"].sum() > corners["bottom left"].sum() + 3 * 20, name  # 2 * 16 levels, 3 channels
        assert corners["top right"][0] - corners["top right"][2] > 10 > corners["top left"][0] - corners["top left"][2]
        empty = image[:16, :16]  # the top-left cell's corner holds no object
        chroma = empty.max(axis=-1) - empty.min(axis=-1)
        assert chroma.max() < min(CHROMA_MIN, OBJECT_CHROMA * 127.5), name
        shade = 16 * (1 - 2 * 16.5 / 64)  # row 16: a quarter of the way down, half the top's shade
        assert abs(image[16, 32].mean() - (np.mean(color) + shade)) < 1.0, name


def test_captions_name_the_scene_and_parse_back():
    rng = np.random.default_rng(1)
    for _ in range(300):
        scene = sample_scene(rng)
        text = caption(scene, rng)
        parsed = parse_caption(text)
        assert [(o.color, o.shape, o.position) for o in parsed.objects] == \
               [(o.color, o.shape, o.position) for o in scene.objects], text
    assert canonical_caption(Scene((ShapeObject("red", "circle", "top left"),))) == "a red circle at the top left"
    assert canonical_caption(Scene((ShapeObject("green", "triangle", "center"),))) == \
        "a green triangle at the center"
    assert parse_caption("a big yellow box in the top right").objects == \
        (ShapeObject("yellow", "square", "top right", "large"),)


def test_bad_captions_and_scenes_are_refused():
    with pytest.raises(ValueError, match="cannot read 'a purple circle at the top'"):
        parse_caption("a purple circle at the top")
    with pytest.raises(ValueError, match="unknown shape 'star'"):
        ShapeObject("red", "star", "top")
    with pytest.raises(ValueError, match="different cells"):
        Scene((ShapeObject("red", "circle", "top"), ShapeObject("blue", "square", "top")))


# --- the judge -------------------------------------------------------------------------------------------------
def test_judge_reads_generator_images():
    scenes, images = scenes_and_images(2, 600)
    scores = accuracy([judge(image, scene) for image, scene in zip(images, scenes)])
    assert scores["prompt"] >= 99.0, scores


def test_judge_rejects_shuffled_captions():
    scenes, images = scenes_and_images(3, 600)
    shuffled = scenes[1:] + scenes[:1]
    scores = accuracy([judge(image, scene) for image, scene in zip(images, shuffled)])
    assert scores["prompt"] <= 20.0, scores


def test_judge_holds_under_blur():
    """A generated image is softer than the generator's: a Gaussian blur of 0.7 px changes no verdict."""
    scenes, images = scenes_and_images(4, 300)
    blurred = [np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(0.7))) for im in images]
    assert accuracy([judge(im, s) for im, s in zip(blurred, scenes)])["prompt"] >= 98.0


def test_judge_counts_each_attribute():
    scene = Scene((ShapeObject("red", "circle", "top left"),))
    image = render(Scene((ShapeObject("red", "square", "top left"),)))
    verdict = judge(image, scene)
    assert verdict.objects[0].color and verdict.objects[0].position and not verdict.objects[0].shape
    assert not verdict.correct
    extra = render(Scene((ShapeObject("red", "circle", "top left"), ShapeObject("blue", "square", "center"))))
    assert not judge(extra, scene).correct and not judge(extra, scene).count  # an object it did not ask for
    blank = render(Scene((ShapeObject("red", "circle", "top left"),), background="gray"))
    blank[:] = 128
    assert judge(blank, scene).objects[0] == judge(blank, scene).objects[0].__class__(False, False, False)


def test_shape_descriptors_on_exact_masks():
    yy, xx = np.mgrid[0:30, 0:30]
    disk = np.argwhere((yy - 14.5) ** 2 + (xx - 14.5) ** 2 <= 12 ** 2)
    square = np.argwhere((yy >= 3) & (yy < 27) & (xx >= 3) & (xx < 27))
    triangle = np.argwhere((yy >= 3) & (yy < 27) & (np.abs(xx - 14.5) <= (yy - 3) / 2))
    for pixels, name in ((disk, "circle"), (square, "square"), (triangle, "triangle")):
        assert classify_shape(pixels, np.full(len(pixels), 200.0)) == name
    assert len(components(np.eye(5, dtype=bool))) == 1  # 8-connected


def test_detect_finds_both_objects_of_a_two_object_scene():
    scene = Scene((ShapeObject("yellow", "triangle", "top right"), ShapeObject("green", "circle", "bottom left")),
                  background="black")
    found = {(d.color, d.shape, d.position) for d in detect(render(scene))}
    assert found == {("yellow", "triangle", "top right"), ("green", "circle", "bottom left")}


def test_prompt_sets_and_accuracy_of_reference_images():
    prompts = one_object_prompts()
    assert len(prompts) == 108 == len(set(prompts)) and prompts[0] == "a red circle at the top left"
    images = reference_images(prompts)
    assert images.dtype == torch.uint8 and images.shape == (108, 3, 64, 64)
    assert prompt_accuracy(images, prompts)[0]["prompt"] == 100.0
    assert prompt_accuracy(images, prompts[1:] + prompts[:1])[0]["prompt"] == 0.0
    pairs = two_object_prompts(40, seed=5)
    assert all(len(parse_caption(p).objects) == 2 for p in pairs) and pairs == two_object_prompts(40, seed=5)
    assert prompt_accuracy(reference_images(pairs), pairs)[0]["prompt"] == 100.0


# --- training ----------------------------------------------------------------------------------------------------
TINY_RUN = dict(vae_steps=40, vae_batch=8, vae_lr=1e-3, pool_size=64, pool_batch=32, steps=16,
                batch=8, lr=1e-3, warmup=1, save_every=4, layout_steps=4, placement_steps=3, polish_steps=4)


def test_schedule_and_loss_weights():
    s = TrainSettings(config=str(SHAPES_CONFIG), steps=100, warmup=10, lr=1.0, min_lr_share=0.1, layout_steps=50,
                      layout_lr=2.0, polish_steps=40, polish_lr=0.5)
    diffusion, layout, placement, polish = (s.plan(p) for p in ("diffusion", "layout", "placement", "polish"))
    assert lr_at(0, diffusion, 0.1) == pytest.approx(0.1) and lr_at(9, diffusion, 0.1) == pytest.approx(1.0)
    assert lr_at(10, diffusion, 0.1) == pytest.approx(1.0) and lr_at(100, diffusion, 0.1) == pytest.approx(0.1)
    assert lr_at(0, layout, 0.1) == pytest.approx(2.0 / 20) and lr_at(49, layout, 0.1) == pytest.approx(2.0)
    assert lr_at(40, polish, 0.1) == pytest.approx(0.05) and lr_at(19, polish, 0.1) == pytest.approx(0.5)
    shares = [(p.high_noise_share, p.high_noise_from, p.x0_weight) for p in (diffusion, layout, placement, polish)]
    assert shares == [(0.0, 0, 0.0), (0.5, 700, 0.3), (0.75, 800, 1.0), (0.25, 800, 1.0)]
    assert not diffusion.train_coordinates and layout.train_coordinates and polish.train_coordinates
    with pytest.raises(ValueError, match="not a diffusion phase"):
        s.plan("vae")
    alphas = torch.tensor([0.99, 0.5, 0.01])
    snr = alphas / (1 - alphas)
    weights = min_snr_weights(alphas, torch.tensor([0, 1, 2]), gamma=5.0)
    assert torch.allclose(weights, torch.minimum(snr, torch.tensor(5.0)) / snr)


def test_high_noise_draws_carry_the_x0_loss():
    """The last `high` draws of a batch weigh as the MSE of the implied x0: eps MSE * (1 - a) / a."""
    alphas = torch.linspace(0.999, 0.004, 1000)
    t = torch.tensor([10, 500, 900, 990])
    per_image = torch.tensor([0.5, 0.2, 0.01, 0.004])
    a = alphas[t]
    x0_mse = per_image * (1 - a) / a
    eps_part = (torch.minimum(a / (1 - a), torch.tensor(5.0)) / (a / (1 - a)) * per_image)
    assert diffusion_loss(per_image, t, alphas, 2, 5.0, 2.0).item() == pytest.approx(
        (eps_part[:2].mean() + 2.0 * x0_mse[2:].mean()).item())
    assert diffusion_loss(per_image, t, alphas, 0, 5.0, 2.0).item() == pytest.approx(eps_part.mean().item())
    assert diffusion_loss(per_image, t, alphas, 4, 5.0, 2.0).item() == pytest.approx(2.0 * x0_mse.mean().item())
    with pytest.raises(ValueError, match="layout-share"):
        TrainSettings(config=str(SHAPES_CONFIG), layout_share=1.5).check()
    with pytest.raises(ValueError, match="placement-from"):
        TrainSettings(config=str(SHAPES_CONFIG), placement_from=1000).check()


# --- the coordinate channels -----------------------------------------------------------------------------------

def test_coordinate_convolution_starts_as_the_plain_one_and_sees_where_it_is():
    torch.manual_seed(0)
    plain = torch.nn.Conv2d(4, 8, 3, padding=1)
    state = torch.random.get_rng_state()
    coord = CoordConv2d(plain)
    assert torch.equal(torch.random.get_rng_state(), state)  # builds without a random draw
    assert coord.weight.shape == (8, 6, 3, 3) and coord.latent_channels == 4
    x = torch.randn(2, 4, 5, 7)
    assert torch.allclose(coord(x), plain(x), atol=1e-6)
    grid = coordinates(2, 5, 7, x)
    assert grid.shape == (2, 2, 5, 7)
    assert grid[0, 0, :, 3].tolist() == pytest.approx([-1.0, -0.5, 0.0, 0.5, 1.0])  # rows, top to bottom
    assert grid[0, 1, 2, :].tolist() == pytest.approx(torch.linspace(-1, 1, 7).tolist())  # columns
    with torch.no_grad():
        coord.weight[:, 4:] = 1.0
    out = coord(torch.zeros(1, 4, 5, 7)) - coord.bias[:, None, None]  # a pure function of the position
    assert not torch.allclose(out[:, :, 0, 3], out[:, :, 4, 3]) and not torch.allclose(out[:, :, 2, 0], out[:, :, 2, 6])


def test_held_coordinates_stay_zero_through_an_adamw_step():
    coord = CoordConv2d(torch.nn.Conv2d(4, 8, 3, padding=1))
    optimizer = torch.optim.AdamW(coord.parameters(), lr=0.1, weight_decay=0.01)
    before = coord.weight.detach().clone()
    coord(torch.randn(2, 4, 6, 6)).pow(2).mean().backward()
    assert coord.weight.grad[:, 4:].abs().sum() > 0
    coord.hold_coordinates()
    optimizer.step()
    assert torch.equal(coord.weight[:, 4:], torch.zeros(8, 2, 3, 3))
    assert not torch.equal(coord.weight[:, :4], before[:, :4])


def test_the_shapes_unet_is_the_compvis_unet_with_the_same_keys_and_draws():
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from omegaconf import OmegaConf

    params = OmegaConf.to_container(OmegaConf.load(str(SHAPES_CONFIG)).model.params.unet_config.params)
    torch.manual_seed(3)
    plain = UNetModel(**params)
    torch.manual_seed(3)
    coord = CoordUNetModel(**params)
    assert list(coord.state_dict()) == list(plain.state_dict())
    for key, value in plain.state_dict().items():
        other = coord.state_dict()[key]
        if key == "input_blocks.0.0.weight":
            assert torch.equal(other[:, :4], value) and not other[:, 4:].any()
        else:
            assert torch.equal(other, value), key
    assert isinstance(build_model(str(SHAPES_CONFIG)).model.diffusion_model, CoordUNetModel)


def held_out_losses(model, seed=99):
    """(VAE reconstruction L1 + L2, epsilon MSE at fixed timesteps and noise) on a fixed held-out batch."""
    batch = scene_batch(seed, 0, 8)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        posterior = model.first_stage_model.encode(batch.images)
        error = model.first_stage_model.decode(posterior.mean) - batch.images
        z = model.scale_factor * posterior.mean
        t = torch.linspace(50, 950, 8).long()
        noise = torch.randn(z.shape, generator=generator)
        eps = model.apply_model(model.q_sample(z, t, noise), t, model.get_learned_conditioning(list(batch.captions)))
    return (error.abs().mean() + error.pow(2).mean()).item(), (eps - noise).pow(2).mean().item()


def test_training_from_scratch_lowers_the_losses(tmp_path):
    trainer = Trainer(TrainSettings(config=str(SHAPES_CONFIG), **TINY_RUN), tmp_path, progress=False)
    vae_before, _ = held_out_losses(trainer.model)
    state = trainer.run()
    assert len(state.losses["vae"]) == TINY_RUN["vae_steps"] and len(state.losses["diffusion"]) == TINY_RUN["steps"]
    assert [len(state.losses[p]) for p in ("layout", "placement", "polish")] == [4, 3, 4]
    first = trainer.model.model.diffusion_model.input_blocks[0][0]
    assert first.weight[:, first.latent_channels:].abs().sum() > 0  # trained in the layout and polish phases
    vae_after, eps_after = held_out_losses(trainer.model)
    assert vae_after < 0.7 * vae_before
    # the UNet's output layer starts at zero, so it first predicts eps = 0 (loss 1); training lowers that
    assert state.losses["diffusion"][0][1] == pytest.approx(1.0, abs=0.1)
    assert eps_after < 0.9


def test_interrupted_training_resumes_to_the_same_weights(tmp_path):
    settings = TrainSettings(config=str(SHAPES_CONFIG), **TINY_RUN)
    whole = Trainer(settings, tmp_path / "whole", progress=False)
    whole.run()

    class StopAt(Trainer):  # Ctrl-C during diffusion step 6, as the SIGINT handler would record it
        def _log(self, phase, step, loss, bar, optimizer):
            if phase == "diffusion" and step == 6:
                self.stop_asked = True
            super()._log(phase, step, loss, bar, optimizer)

    with pytest.raises(KeyboardInterrupt):
        StopAt(settings, tmp_path / "cut", progress=False).run()
    resumed = Trainer(settings, tmp_path / "cut", progress=False)
    assert resumed.state.phase == "diffusion" and resumed.state.step == 7
    resumed.run()
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    with pytest.raises(ValueError, match="other settings"):
        Trainer(dataclasses.replace(settings, lr=0.5), tmp_path / "cut", progress=False)
    assert (tmp_path / "cut" / STATE_FILE).is_file()


def test_exported_checkpoint_loads_through_the_normal_loader(tmp_path):
    from ldm.util import load_model_from_config
    from omegaconf import OmegaConf

    trainer = Trainer(TrainSettings(config=str(SHAPES_CONFIG), **dict(TINY_RUN, steps=2, vae_steps=2)), tmp_path,
                      progress=False)
    trainer.run()
    model = trainer.ema_model()
    state = compvis_state_dict(model)
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in state)
    assert state["model.diffusion_model.input_blocks.0.0.weight"].dtype == torch.float16
    assert state["alphas_cumprod"].dtype == torch.float32 and "scale_factor" in state
    record = write_checkpoint(model, tmp_path / "m.safetensors", {"seed": 0})
    assert record["bytes"] == (tmp_path / "m.safetensors").stat().st_size and len(record["sha256"]) == 64
    loaded = load_model_from_config(OmegaConf.load(str(SHAPES_CONFIG)), str(tmp_path / "m.safetensors"))
    assert float(loaded.scale_factor) == pytest.approx(float(model.scale_factor))
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 900])
    c = loaded.get_learned_conditioning(["a red circle at the top", ""])
    with torch.no_grad():
        expected = model.half().float().apply_model(x, t, model.get_learned_conditioning(["a red circle at the top",
                                                                                           ""]))
        assert torch.allclose(loaded.apply_model(x, t, c), expected, atol=1e-5)
