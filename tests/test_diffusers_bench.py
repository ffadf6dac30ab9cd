"""sdgen.diffusers_bench: the methods it compares run on a diffusers pipeline, DaTo is also compared at DeepCache's
full steps, every row's fidelity to the original is right, and the table is built right."""
import math
import sys

import pytest
import torch

pytest.importorskip("diffusers")

from datosd import Strategy  # noqa: E402
from sdgen.diffusers_bench import B1, PROMPT, compare, every_nth_step, format_table  # noqa: E402
from sdgen.fidelity import psnr, relative_rms_error  # noqa: E402
from sdgen.methods import dato_method, parse_method  # noqa: E402
from diffusers_pipelines import GOLDEN_IMAGE_SIZE, SDXL_LATENT, golden_pipeline, tiny_sdxl_pipeline  # noqa: E402

STEPS = 4


def test_every_nth_step_keeps_the_schedule():
    b1 = Strategy.load(B1)
    ten = every_nth_step(b1, 10)
    assert ten.cache_depth == [b1.cache_depth[5 * i] for i in range(10)]
    assert ten.prune_ratio == [b1.prune_ratio[5 * i] for i in range(10)]
    with pytest.raises(ValueError, match="divisor of 50"):
        every_nth_step(b1, 7)


def test_compare_runs_every_method_and_skips_a_missing_one(monkeypatch):
    pytest.importorskip("DeepCache")
    pipe = golden_pipeline()
    strategy = Strategy([12, 1], [0.5, 0.5], name="tiny")
    rows = compare(pipe, steps=2, size=GOLDEN_IMAGE_SIZE, strategy=strategy, repeats=1, warmup=0,
                   deepcache=(2, 0))
    assert [row.method for row in rows] == ["original", "deepcache", "dato-matched", "tomesd", "dato"]
    assert all(len(row.seconds) == 1 and row.speedup > 0 for row in rows)
    assert rows[0].speedup == 1.0
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"  # every method undid its patch
    assert "step" not in vars(pipe.scheduler) and "forward" not in vars(pipe.unet)
    table = format_table(rows)
    assert table.count("\n") == 6 and "datosd.apply_patch tiny" in table

    monkeypatch.setitem(sys.modules, "DeepCache", None)  # import DeepCache now raises ImportError
    rows = compare(pipe, steps=2, size=GOLDEN_IMAGE_SIZE, strategy=strategy, repeats=1, warmup=0,
                   methods=("original", "deepcache"))
    assert rows[1].skipped.startswith("not importable") and rows[1].seconds == []
    assert "skipped" in format_table(rows)
    with torch.no_grad():
        assert pipe.unet(torch.zeros(1, 4, 16, 16), 1, torch.zeros(1, 77, 16)).sample.shape == (1, 4, 16, 16)


def test_relative_rms_error_and_psnr_against_hand_computations():
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(2, 4, 8, 8, generator=generator)
    x = reference + 0.1 * torch.randn(2, 4, 8, 8, generator=generator)
    assert relative_rms_error(reference, reference) == 0.0
    pairs = list(zip(x.flatten().tolist(), reference.flatten().tolist()))
    expected = math.sqrt(sum((a - b) ** 2 for a, b in pairs) / sum(b ** 2 for _, b in pairs))
    assert relative_rms_error(x, reference) == pytest.approx(expected, rel=1e-9)
    assert relative_rms_error(3 * reference, reference) == pytest.approx(2.0)
    with pytest.raises(ValueError, match=r"shapes \(2, 4, 8, 8\) and \(1, 4, 8, 8\)"):
        relative_rms_error(x, reference[:1])
    images = torch.zeros(1, 3, 4, 4)
    assert psnr(images, images) == math.inf
    assert psnr(images, images + 0.5) == pytest.approx(10 * math.log10(4 / 0.25))  # peak-to-peak 2, MSE 1/4


def run_latents(pipe, method, size, seed=0):
    """Final latents of one run as compare() makes it (same prompt, seed and settings), `method` applied by hand."""
    latents = torch.randn((1, 4, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor),
                          generator=torch.Generator().manual_seed(seed))

    def run():
        with torch.no_grad():
            return pipe(PROMPT, height=size, width=size, num_inference_steps=STEPS, guidance_scale=7.5,
                        latents=latents, output_type="latent").images

    if method is None:
        return run()
    with method.apply(pipe, STEPS, seed=seed):
        return run()


def decoded(pipe, latents):
    with torch.no_grad():
        return pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample


def test_every_row_reports_its_full_steps_and_its_fidelity_to_the_original():
    """DaTo at DeepCache's full steps has the helper's schedule and DaTo's ratios; each row's relative RMS error
    and PSNR equal the same method applied by hand and compared with the plain run."""
    pytest.importorskip("DeepCache")
    pipe = golden_pipeline()
    strategy = Strategy([12, 1, 1, 1], [0.5, 0.6, 0.3, 0.5], name="tiny")
    rows = compare(pipe, steps=STEPS, size=GOLDEN_IMAGE_SIZE, strategy=strategy, repeats=1, warmup=0,
                   deepcache=(2, 0))
    by_method = {row.method: row for row in rows}
    assert {m: row.full_steps for m, row in by_method.items()} == {
        "original": 4, "deepcache": 2, "dato-matched": 2, "tomesd": 4, "dato": 1}
    original = by_method["original"]
    assert original.rel_error == 0.0 and original.psnr == math.inf
    plain = run_latents(pipe, None, GOLDEN_IMAGE_SIZE)
    matched = Strategy([12, 1, 12, 1], strategy.prune_ratio)  # the helper's schedule: every 2nd step full
    by_hand = {"deepcache": parse_method("deepcache-helper-n2"), "dato-matched": dato_method(matched),
               "tomesd": parse_method("tome-0.5"), "dato": dato_method(strategy)}
    for name, method in by_hand.items():
        x = run_latents(pipe, method, GOLDEN_IMAGE_SIZE)
        expected = ((x.double() - plain.double()).pow(2).mean() / plain.double().pow(2).mean()).sqrt().item()
        assert expected > 1e-3, name  # every method changed the result
        assert by_method[name].rel_error == pytest.approx(expected, rel=1e-6), name
        mse = (decoded(pipe, x).clamp(-1, 1) - decoded(pipe, plain).clamp(-1, 1)).pow(2).mean().item()
        assert by_method[name].psnr == pytest.approx(10 * math.log10(4 / mse), rel=1e-6), name
    assert "deepcache-helper-n2" in by_method["dato-matched"].setting
    table = format_table(rows)
    assert "full steps" in table and "rel. RMS error" in table and "PSNR" in table
    assert "| dato-matched |" in table and "| 2 |" in table


def test_tomesd_merges_at_sdxls_first_attention_level():
    """SDXL's highest-resolution level has no attention: tomesd gets max_downsample 2 and merges at the next."""
    pytest.importorskip("tomesd")
    sdxl = tiny_sdxl_pipeline()
    lengths = []
    handles = [m.attn1.register_forward_pre_hook(lambda m, args, kwargs: lengths.append(args[0].shape[1]),
                                                 with_kwargs=True)
               for m in sdxl.unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    try:
        rows = compare(sdxl, steps=2, size=2 * SDXL_LATENT, methods=("original", "tomesd"), repeats=1, warmup=0)
    finally:
        for handle in handles:
            handle.remove()
    top = (SDXL_LATENT // 2) ** 2  # tokens of the first attention level (2x down)
    original, merged = lengths[:len(lengths) // 2], lengths[len(lengths) // 2:]
    assert top in original and top // 2 not in original
    assert top // 2 in merged and top not in merged
    assert "max_downsample=2" in rows[1].setting
    assert rows[1].rel_error > 1e-3 and rows[0].rel_error == 0.0
    assert type(sdxl.unet).__name__ == "UNet2DConditionModel"


@pytest.mark.parametrize("branch", [0, 1])
def test_the_helpers_schedule_as_a_dato_strategy_gives_the_helpers_latents(branch):
    """DeepCache's helper at (interval, branch) caches what datosd caches under the helper kind's strategy (full
    every interval-th step, cache depth branch + 1 otherwise): the two give the same latents."""
    pytest.importorskip("DeepCache")
    pipe = golden_pipeline()
    helper = parse_method(f"deepcache-helper-n3-b{branch}")
    schedule = helper.patch_strategy(STEPS)
    assert schedule.cache_depth == [12, branch + 1, branch + 1, 12]
    plain = run_latents(pipe, None, GOLDEN_IMAGE_SIZE)
    by_helper = run_latents(pipe, helper, GOLDEN_IMAGE_SIZE)
    by_dato = run_latents(pipe, dato_method(schedule), GOLDEN_IMAGE_SIZE)
    assert relative_rms_error(by_helper, plain) > 1e-3
    torch.testing.assert_close(by_dato, by_helper, atol=1e-4, rtol=1e-5)


def test_with_depths_keeps_the_ratios_on_another_schedule():
    strategy = Strategy([12, 0, 1, 5], [0.5, 0.6, 0.3, 0.4], name="s")
    matched = strategy.with_depths(Strategy.uniform(4, 2, 1, name="dc"))
    assert (matched.cache_depth, matched.prune_ratio, matched.name) == ([12, 1, 12, 1], [0.5, 0.6, 0.3, 0.4], "s-on-dc")
    with pytest.raises(ValueError, match="with_depths of a 5-step schedule; expected 4 steps"):
        strategy.with_depths(Strategy.full(5))
