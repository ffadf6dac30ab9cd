"""scripts/img2img.py on the demo model: CompVis flags, the acceleration flags, and its input checks."""
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from sdgen.cli import img2img as IMG2IMG
from helpers import TINY_DEMO


@pytest.fixture
def init_image(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "init.png"
    Image.fromarray(rng.integers(0, 256, size=(100, 140, 3), dtype=np.uint8)).save(path)
    return path


def run(capsys, *args):
    code = IMG2IMG.main(list(args))
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


def common(init_image, outdir):
    return [*TINY_DEMO, "--init-img", str(init_image), "--outdir", str(outdir), "--n_samples", "2",
            "--ddim_steps", "10", "--strength", "0.5", "--precision", "full"]


def test_img2img_runs_t_enc_steps_and_keeps_the_cut_size(tmp_path, capsys, init_image):
    result = run(capsys, *common(init_image, tmp_path / "plain"))
    assert result.returncode == 0, result.stderr
    assert "runs 5 of 10 DDIM steps" in result.stdout
    images = sorted((tmp_path / "plain" / "samples").glob("*.png"))
    assert len(images) == 2
    assert Image.open(images[0]).size == (128, 64)  # 140x100 cut to multiples of 64
    again = run(capsys, *common(init_image, tmp_path / "again"))
    assert again.returncode == 0
    assert (tmp_path / "again/samples/00000.png").read_bytes() == images[0].read_bytes()


def test_img2img_with_acceleration(tmp_path, capsys, init_image):
    strategy = tmp_path / "s.yaml"
    strategy.write_text("steps: 5\ncache_depth: [12, 1, 0, 12, 1]\nprune_ratio: [0.5, 0.5, 0.3, 0.4, 0.6]\n")
    dato = run(capsys, *common(init_image, tmp_path / "dato"), "--dato", "--strategy", str(strategy))
    assert dato.returncode == 0, dato.stderr
    assert "DaTo [s: 5 steps, 2 full / 2 partial / 1 reused" in dato.stdout
    deepcache = run(capsys, *common(init_image, tmp_path / "dc"), "--deepcache", "--cache_interval", "2")
    assert deepcache.returncode == 0
    plain = run(capsys, *common(init_image, tmp_path / "plain"))
    assert plain.returncode == 0
    read = lambda d: (tmp_path / d / "samples/00000.png").read_bytes()  # noqa: E731
    assert read("dato") != read("plain") and read("dc") != read("plain")


def test_default_dato_uses_the_last_steps_of_b1_and_says_so(tmp_path, capsys, init_image):
    result = run(capsys, *common(init_image, tmp_path / "dato"), "--dato")
    assert result.returncode == 0, result.stderr
    assert "uses its last 5 steps (dato@last5)" in result.stdout
    assert len(list((tmp_path / "dato" / "samples").glob("*.png"))) == 2


def test_strength_one_runs_every_step_from_pure_noise(tmp_path, capsys, init_image):
    result = run(capsys, *common(init_image, tmp_path / "full"), "--strength", "1.0")
    assert result.returncode == 0, result.stderr
    assert "runs 10 of 10 DDIM steps" in result.stdout
    # Full destruction: the result does not depend on the init image.
    other = tmp_path / "other.png"
    Image.fromarray(np.zeros((100, 140, 3), dtype=np.uint8)).save(other)
    again = run(capsys, *common(other, tmp_path / "full-other"), "--strength", "1.0")
    assert again.returncode == 0, again.stderr
    pixels = lambda d: np.asarray(Image.open(tmp_path / d / "samples/00000.png"))  # noqa: E731
    np.testing.assert_array_equal(pixels("full"), pixels("full-other"))


@pytest.mark.parametrize("extra,message", [
    (["--dato", "--strategy", "b1"], "has 50 steps but the sampler runs 5"),
    (["--strength", "1.5"], "--strength must be in [0, 1]"),
    (["--strength", "0.05"], "runs no step"),
])
def test_bad_input(tmp_path, capsys, init_image, extra, message):
    result = run(capsys, *common(init_image, tmp_path / "out"), *extra)
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "out").exists()


def test_missing_init_image(tmp_path, capsys):
    result = run(capsys, *TINY_DEMO, "--init-img", str(tmp_path / "none.png"), "--outdir", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "none.png does not exist" in result.stderr


@pytest.mark.parametrize("extra,message", [
    (["--n_samples", "100000"], "a run at 64x128 with --n_samples 100000 (UNet rows doubled for guidance) needs at "
                                "least "),
    (["--seed", "18446744073709551617"], "--seed must be in 0..18446744073709551615"),
    (["--prompt", "a cat", "--from-file", "prompts.txt"], "--prompt and --from-file were both given"),
])
def test_sizes_seeds_and_prompts_that_cannot_run_are_refused_before_the_model(tmp_path, capsys, monkeypatch,
                                                                               init_image, extra, message):
    (tmp_path / "prompts.txt").write_text("a dog\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(IMG2IMG.gen, "load_model", lambda *a, **k: pytest.fail("model built"))
    result = run(capsys, *common(init_image, tmp_path / "out"), *extra)
    assert result.returncode == 2 and result.stderr.count("error:") == 1 and message in result.stderr, result.stderr
    if "needs at least" in message:
        assert "lower the --init-img size or --n_samples" in result.stderr
    assert not (tmp_path / "out").exists()
