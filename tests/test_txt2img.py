"""scripts/txt2img.py end to end on the demo model, and its input checks."""
import hashlib
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import REPO_ROOT
from sdgen.cli import txt2img as TXT2IMG
from helpers import TINY_DEMO

SCRIPT = REPO_ROOT / "scripts" / "txt2img.py"



def run(*args, cwd=REPO_ROOT):
    """Run the script as a user would, in a fresh process."""
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def run_here(capsys, *args):
    """Run the script's main() in this process (fast, for the checks that stop before sampling)."""
    code = TXT2IMG.main(list(args))
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


DEMO = [*TINY_DEMO, "--n_samples", "2", "--n_iter", "1", "--ddim_steps", "5", "--H", "64", "--W", "64",
        "--precision", "full"]


def test_demo_writes_samples_and_grid_reproducibly(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    result = run(*DEMO, "--outdir", str(first))
    assert result.returncode == 0, result.stderr
    assert "random-weight" in result.stdout
    assert sorted(p.name for p in (first / "samples").iterdir()) == ["00000.png", "00001.png"]
    assert (first / "grid-0000.png").exists()
    assert run(*DEMO, "--outdir", str(second)).returncode == 0
    for name in ("samples/00000.png", "samples/00001.png", "grid-0000.png"):
        assert digest(first / name) == digest(second / name)
    assert digest(first / "samples/00000.png") != digest(first / "samples/00001.png")
    # An existing outdir is appended to, never overwritten.
    before = digest(first / "samples/00000.png")
    assert run(*DEMO, "--outdir", str(first), "--seed", "7").returncode == 0
    assert sorted(p.name for p in (first / "samples").iterdir()) == [f"{i:05}.png" for i in range(4)]
    assert (first / "grid-0001.png").exists()
    assert digest(first / "samples/00000.png") == before


@pytest.mark.parametrize("args,message", [
    (["--ckpt", "does/not/exist.ckpt"], "checkpoint not found: does/not/exist.ckpt"),
    ([*TINY_DEMO, "--H", "100"], "multiples of 64"),
    ([*TINY_DEMO, "--ddim_steps", "0"], "--ddim_steps must be at least 1"),
    ([*TINY_DEMO, "--plms", "--ddim_eta", "0.5"], "--ddim_eta must be 0 with --plms"),
    ([*TINY_DEMO, "--from-file", "missing-prompts.txt"], "missing-prompts.txt does not exist"),
    ([*TINY_DEMO, "--scale", "nan"], "finite"),
])
def test_bad_input_fails_before_writing(tmp_path, capsys, args, message):
    outdir = tmp_path / "out"
    result = run_here(capsys, *args, "--outdir", str(outdir))
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stderr.count("error:") == 1
    assert not outdir.exists()


@pytest.mark.parametrize("flags,label", [
    (["--dato", "--plms", "--ddim_steps", "50"], "DaTo [b1: 50 steps, 6 full / 38 partial / 6 reused"),
    (["--deepcache", "--cache_interval", "3", "--cache_depth", "1"], "method: deepcache-n3 = DeepCache N=3 depth 1"),
    (["--tome", "--tome_ratio", "0.5"], "method: tome-0.5 = ToMeSD r=0.5"),
    (["--deepcache", "--tome"], "method: deepcache-n3+tome-0.5 = DeepCache N=3 depth 1 + ToMeSD r=0.5"),
])
def test_acceleration_flags_write_images(tmp_path, capsys, flags, label):
    result = run_here(capsys, *DEMO, *flags, "--outdir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert label in result.stdout
    assert "sampling time:" in result.stdout
    assert len(list((tmp_path / "out" / "samples").glob("*.png"))) == 2


def write_strategy(path, steps, depth=1, ratio=0.5):
    path.write_text(f"steps: {steps}\ncache_depth: {[12] + [depth] * (steps - 1)}\n"
                    f"prune_ratio: {[ratio] * steps}\n")
    return path


@pytest.mark.parametrize("make_args,message", [
    (lambda d: ["--dato", "--strategy", str(write_strategy(d / "s.yaml", 10))], "has 10 steps but the sampler runs 5"),
    (lambda d: ["--dato"], "strategy 'b1' has 50 steps but the sampler runs 5"),
    (lambda d: ["--dato", "--strategy", str(write_strategy(d / "s.yaml", 5, ratio=1.2))], "prune_ratio[0] = 1.2"),
    (lambda d: ["--dato", "--strategy", str(write_strategy(d / "s.yaml", 5, depth=13))], "cache_depth[1] = 13"),
    (lambda d: ["--deepcache", "--cache_depth", "13"], "--cache_depth must be in 0..12"),
    (lambda d: ["--tome", "--tome_ratio", "1.2"], "--tome_ratio must be in [0, 1)"),
    (lambda d: ["--dato", "--tome"], "do not combine"),
])
def test_bad_acceleration_input_fails_before_sampling(tmp_path, capsys, make_args, message):
    outdir = tmp_path / "out"
    result = run_here(capsys, *DEMO, *make_args(tmp_path), "--outdir", str(outdir))
    assert result.returncode == 2
    assert message in result.stderr
    assert not outdir.exists()


TINY = [*TINY_DEMO, "--n_samples", "1", "--n_iter", "1", "--ddim_steps", "3", "--H", "64", "--W", "64",
        "--precision", "full", "--skip_grid"]


def pixels(path):
    from PIL import Image
    import numpy as np

    with Image.open(path) as image:
        return np.asarray(image)


SEEDED_FLAGS = [["--ddim_eta", "0.5"], ["--tome"], ["--deepcache", "--tome"],
                ["--method", "dato@last3"]]  # DaTo with b1's last 3 steps


def test_one_seed_gives_the_same_pixels_in_two_processes(tmp_path):
    """Each process runs txt2img once per flag set (one process per side keeps the test fast)."""
    script = ("import sys; from sdgen.cli.txt2img import main\n"
              "for k, flags in enumerate(eval(sys.argv[2])):\n"
              "    assert main([*eval(sys.argv[3]), *flags, '--seed', '5', '--outdir', f'{sys.argv[1]}/{k}']) == 0\n")
    for side in ("a", "b"):
        result = subprocess.run([sys.executable, "-c", script, str(tmp_path / side), repr(SEEDED_FLAGS), repr(TINY)],
                                cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
    for k in range(len(SEEDED_FLAGS)):
        a, b = (pixels(tmp_path / side / str(k) / "samples/00000.png") for side in ("a", "b"))
        assert (a == b).all(), SEEDED_FLAGS[k]
    assert not (pixels(tmp_path / "a/0/samples/00000.png") == pixels(tmp_path / "a/1/samples/00000.png")).all()


def output_dir_cases(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    return {"file": (a_file, "is a file, not a folder"),
            "under a file": (a_file / "out", "which is a file, not a folder")}


@pytest.mark.parametrize("case", ["file", "under a file"])
def test_unusable_outdir_is_refused_before_the_model_is_built(tmp_path, capsys, monkeypatch, case):
    outdir, message = output_dir_cases(tmp_path)[case]
    monkeypatch.setattr(TXT2IMG.gen, "load_model", lambda *a, **k: pytest.fail("model built"))
    result = run_here(capsys, *TINY, "--outdir", str(outdir))
    assert result.returncode == 2 and message in result.stderr and result.stderr.count("error:") == 1
    assert (tmp_path / "a-file").read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_outdir_is_refused(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    result = run_here(capsys, *TINY, "--outdir", str(locked / "out"))
    assert result.returncode == 2 and "cannot write" in result.stderr


@pytest.mark.parametrize("flags,message", [
    (["--C", "3"], "--C 3 does not fit the model: its latents have 4 channels"),
    (["--f", "4"], "--f 4 does not fit the model: its autoencoder downsamples by 8"),
    (["--method", "dato@r1.5"], "prune_ratio"),
    (["--method", "ddim10", "--tome"], "--method ddim10 names the whole method"),
])
def test_model_geometry_and_method_flags_are_checked_first(tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.setattr(TXT2IMG.gen, "load_model", lambda *a, **k: pytest.fail("model built"))
    result = run_here(capsys, *TINY, *flags, "--outdir", str(tmp_path / "out"))
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_parity_preset_is_recorded_in_the_png(tmp_path, capsys):
    result = run_here(capsys, *TINY, "--method", "dato@last3,parity", "--outdir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "method: dato@last3,parity" in result.stdout
    from PIL import Image

    with Image.open(tmp_path / "out/samples/00000.png") as image:
        assert image.text["method"] == "dato@last3,parity"


@pytest.mark.parametrize("flags,message", [
    (["--H", "99968", "--W", "99968"], "a run at 99968x99968 with --n_samples 1 (UNet rows doubled for guidance) "
                                       "needs at least "),
    (["--n_samples", "100000000"], "a run at 64x64 with --n_samples 100000000 (UNet rows doubled for guidance) "
                                   "needs at least "),
    (["--seed", "18446744073709551617"], "--seed must be in 0..18446744073709551615: torch's generators take seeds "
                                         "up to 2**64 - 1, got 18446744073709551617"),
    (["--seed", "18446744073709551615", "--n_iter", "2"], "--seed must be in 0..18446744073709551614 (this run "
                                                           "uses seeds --seed to --seed + 1)"),
    (["--prompt", "a cat", "--from-file", str(REPO_ROOT / "data" / "imagenet-class-prompts.txt")],
     "--prompt and --from-file were both given"),
])
def test_sizes_seeds_and_prompts_that_cannot_run_are_refused_before_the_model(tmp_path, capsys, monkeypatch, flags,
                                                                               message):
    monkeypatch.setattr(TXT2IMG.gen, "load_model", lambda *a, **k: pytest.fail("model built"))
    result = run_here(capsys, *TINY, *flags, "--outdir", str(tmp_path / "out"))
    assert result.returncode == 2 and result.stderr.count("error:") == 1 and message in result.stderr, result.stderr
    if "needs at least" in message:
        assert "GiB" in result.stderr and "available" in result.stderr and "weights not counted" in result.stderr
    assert not (tmp_path / "out").exists()


def test_the_largest_seed_runs(tmp_path, capsys):
    result = run_here(capsys, *TINY, "--seed", "18446744073709551615", "--outdir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    from PIL import Image

    with Image.open(tmp_path / "out/samples/00000.png") as image:
        assert image.text["seed"] == "18446744073709551615"


def test_a_method_with_its_own_steps_says_so_and_long_prompts_warn_once(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    long = "a watercolor painting of " + "a harbour with boats, " * 20
    prompts.write_text(f"a cat\n{long}\n")
    result = run_here(capsys, *TINY, "--n_iter", "2", "--method", "ddim2", "--plms", "--from-file", str(prompts),
                      "--outdir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "note: ddim2 sets its own sampling: it runs the ddim sampler, not plms (--plms) and 2 steps, not " \
           "--ddim_steps 3\n" in result.stdout
    from ldm.modules.encoders.modules import CLIPTokenizerHF

    tokens = len(CLIPTokenizerHF().encode(long)) + 2
    assert result.stderr.count("warning:") == 1  # once per run, not once per batch or pass
    assert (f"warning: 1 of 2 prompts are longer than the text encoder's 77 tokens (the longest has {tokens} "
            f"tokens)") in result.stderr
    from PIL import Image

    with Image.open(tmp_path / "out/samples/00003.png") as image:  # 2 passes x 2 prompts
        assert image.text["steps"] == "2" and image.text["sampler"] == "ddim"


def nan_checkpoint(path):
    """The golden tiny model's weights with the UNet's last conv NaN: every sample is NaN."""
    import torch
    from safetensors.torch import load_file, save_file

    from conftest import GOLDEN_WEIGHTS

    weights = load_file(str(GOLDEN_WEIGHTS))
    weights["model.diffusion_model.out.2.weight"] = torch.full_like(weights["model.diffusion_model.out.2.weight"],
                                                                    float("nan"))
    save_file(weights, str(path))
    return path


def test_nan_latents_fail_in_one_line_and_write_no_image(tmp_path, capsys):
    from conftest import GOLDEN_CONFIG
    from sdgen.cli import run as run_cli

    ckpt = nan_checkpoint(tmp_path / "nan.safetensors")
    args = ["--config", str(GOLDEN_CONFIG), "--ckpt", str(ckpt), *TINY[1:], "--outdir", str(tmp_path / "out")]
    assert run_cli(TXT2IMG.main, args) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert "error: sampling ended in 256 NaN or infinite values of 256 latents, which decode to a blank image" in err
    assert not (tmp_path / "out").exists()
