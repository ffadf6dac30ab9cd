"""scripts/sample_prompts.py on the tiny demo model: per-image seeds, torchrun sharding, resuming, input checks.

Determinism notes (what is asserted and why):
- One process vs two gloo processes (batch size 1): the same PNG bytes. Both runs use one CPU thread per
  process (OMP_NUM_THREADS=1) so the float math is the same kernel sequence.
- Batch size 1 vs 3: NOT bit-identical, and cannot be without changing the model code: a (3, C) x (C, D)
  matrix product and three (1, C) x (C, D) ones use different BLAS blocking (the very first Linear of the
  time embedding already differs in the last bits). The starting noise is identical, so the images agree to
  within one grey level on a small fraction of pixels, which is what the test asserts.
"""
import hashlib
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT
from sdgen import prompt_set
from sdgen.cli import sample_prompts as SAMPLE
from sdgen.runtime import set_threads
from helpers import TINY_DEMO

SCRIPT = REPO_ROOT / "scripts" / "sample_prompts.py"
PROMPTS = ["a photograph of an astronaut riding a horse", "tench, Tinca tinca", "a red car on a wet street",
           "two birds on a wire", "a bowl of fruit"]
TINY = [*TINY_DEMO, "--H", "64", "--W", "64", "--ddim_steps", "3", "--precision", "full", "--device", "cpu",
        "--no_progress"]



@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread while this module generates in-process: on 2 shared, busy cores, 2 threads that
    wait for each other in every parallel region are many times slower than 1."""
    import torch

    before = torch.get_num_threads()
    set_threads(1)
    yield
    set_threads(before)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("".join(p + "\n" for p in PROMPTS), encoding="utf-8")
    return path


def run_process(args, nproc=1):
    """A fresh process (or `nproc` under torchrun), one CPU thread each."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    result = subprocess.run([*launcher, str(SCRIPT), *args], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def run_here(capsys, *args):
    code = SAMPLE.main(list(args))
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


def digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.png"))}


def pixels(path):
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB")).astype(np.int16)


def manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def names(n):
    return [f"{k:06d}.png" for k in range(n)]


def test_two_torchrun_processes_give_the_same_png_bytes_as_one(prompt_file, tmp_path):
    # With ToMeSD: its random partition is seeded per batch too, so the processes agree.
    args = [*TINY, "--from-file", str(prompt_file), "--repeats", "2", "--limit", "7", "--seed", "3", "--tome"]
    run_process([*args, "--outdir", str(tmp_path / "one")])
    two = run_process([*args, "--outdir", str(tmp_path / "two")], nproc=2)

    one_d, two_d = digests(tmp_path / "one"), digests(tmp_path / "two")
    assert sorted(one_d) == names(7)
    assert one_d == two_d
    assert len(set(one_d.values())) == 7  # seven different images, not one repeated
    m1, m2 = manifest(tmp_path / "one"), manifest(tmp_path / "two")
    assert m2["runs"][-1]["processes"] == 2 and m1["runs"][-1]["processes"] == 1
    assert m2["count"] == m2["total"] == 7 and m2["complete"] and m2["runs"][-1]["generated"] == 7
    assert m2["seconds_per_image"] > 0 and m2["settings"] == m1["settings"]
    assert "generated 7 images" in two.stdout and two.stdout.count("7 of 7 now in") == 1  # rank 0 reports alone
    # image 6 = repeat 1, prompt index 1, seed 3 + 6
    with Image.open(tmp_path / "two" / "000006.png") as img:
        assert img.text["prompt"] == PROMPTS[1] and img.text["seed"] == "9" and img.text["index"] == "6"
        assert img.size == (64, 64)


@pytest.fixture(scope="module")
def base_run(prompt_file, tmp_path_factory):
    """6 images (5 prompts, 2 repeats, limit 6), batch size 1, in this process."""
    outdir = tmp_path_factory.mktemp("base")
    assert SAMPLE.main([*TINY, "--from-file", str(prompt_file), "--repeats", "2", "--limit", "6",
                        "--outdir", str(outdir)]) == 0
    return outdir


def test_seed_of_image_k_is_seed_plus_k(base_run, prompt_file, tmp_path):
    # image 5 of the base run (prompt 0, seed 0 + 5) == image 0 of a run with --seed 5 (prompt 0, seed 5 + 0)
    assert SAMPLE.main([*TINY, "--from-file", str(prompt_file), "--limit", "1", "--seed", "5",
                        "--outdir", str(tmp_path)]) == 0
    np.testing.assert_array_equal(pixels(tmp_path / "000000.png"), pixels(base_run / "000005.png"))
    # ... and differs a lot from image 0 of the base run (same prompt, seed 0)
    assert np.abs(pixels(tmp_path / "000000.png") - pixels(base_run / "000000.png")).mean() > 10


def test_resume_makes_only_the_missing_images(base_run, prompt_file, tmp_path, capsys, monkeypatch):
    outdir = tmp_path / "resume"
    args = [*TINY, "--from-file", str(prompt_file), "--repeats", "2", "--limit", "6", "--outdir", str(outdir)]
    outdir.mkdir()
    for name in names(6):
        (outdir / name).write_bytes((base_run / name).read_bytes())
    (outdir / "manifest.json").write_bytes((base_run / "manifest.json").read_bytes())
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in outdir.glob("*.png")}
    for name in ("000001.png", "000004.png"):
        (outdir / name).unlink()
    (outdir / ".000004.png.tmp").write_bytes(b"\x89PNG truncated")  # an interrupted write

    result = run_here(capsys, *args)
    assert result.returncode == 0, result.stderr
    assert "generated 2 images, 6 of 6" in result.stdout
    m = manifest(outdir)
    assert [r["generated"] for r in m["runs"]] == [6, 2] and m["complete"]
    assert sorted(p.name for p in outdir.iterdir()) == [*names(6), "manifest.json"]  # no temp file left
    for name, stat in before.items():
        p = outdir / name
        if name in ("000001.png", "000004.png"):
            assert p.read_bytes() == (base_run / name).read_bytes()  # remade identically
        else:
            assert (p.stat().st_ino, p.stat().st_mtime_ns) == stat  # untouched

    # nothing missing: no model is even built
    monkeypatch.setattr(prompt_set.gen, "load_model", lambda *a, **k: pytest.fail("model loaded with nothing to do"))
    result = run_here(capsys, *args)
    assert result.returncode == 0 and "generated 0 images, 6 of 6" in result.stdout
    assert manifest(outdir)["runs"][-1]["generated"] == 0


def test_batch_size_changes_images_by_at_most_one_grey_level(base_run, prompt_file, tmp_path):
    assert SAMPLE.main([*TINY, "--from-file", str(prompt_file), "--repeats", "2", "--limit", "6",
                        "--batch_size", "3", "--outdir", str(tmp_path)]) == 0
    assert manifest(tmp_path)["runs"][-1]["batch_size"] == 3
    for name in names(6):
        diff = np.abs(pixels(tmp_path / name) - pixels(base_run / name))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, name
    # the bound means something: two different images of the run differ by far more
    assert np.abs(pixels(base_run / "000000.png") - pixels(base_run / "000001.png")).mean() > 10


def test_dato_runs_with_a_strategy_for_the_step_count(prompt_file, tmp_path):
    from datosd.strategy import Strategy

    Strategy([12, 1, 0], [0.5, 0.5, 0.3], name="tiny3").save(tmp_path / "tiny3.yaml")
    outdir = tmp_path / "out"
    assert SAMPLE.main([*TINY, "--plms", "--from-file", str(prompt_file), "--limit", "2", "--dato",
                        "--strategy", str(tmp_path / "tiny3.yaml"), "--outdir", str(outdir)]) == 0
    m = manifest(outdir)
    assert m["method_label"].startswith("DaTo [tiny3") and m["count"] == 2
    assert m["settings"]["strategy"]["cache_depth"] == [12, 1, 0]


@pytest.mark.parametrize("extra, message", [
    (["--from-file", "MISSING"], "prompt file not found"),
    (["--H", "60"], "multiples of 64"),
    (["--batch_size", "0"], "--batch_size must be at least 1"),
    (["--dato"], "50 steps"),  # the default b1 strategy does not fit 3 steps
    (["--tome_ratio", "1.5", "--tome"], "--tome_ratio must be in [0, 1)"),
    (["--demo_typo"], None),
])
def test_bad_input_is_refused_before_any_work(prompt_file, tmp_path, capsys, extra, message):
    outdir = tmp_path / "never"
    args = [*TINY, "--from-file", str(prompt_file), "--outdir", str(outdir), *extra]
    if message is None:  # argparse's own refusal
        with pytest.raises(SystemExit) as exc:
            SAMPLE.main(args)
        assert exc.value.code == 2
        return
    result = run_here(capsys, *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not outdir.exists()


def test_blank_prompt_line_and_changed_settings_are_refused(base_run, prompt_file, tmp_path, capsys):
    blank = tmp_path / "blank.txt"
    blank.write_text("a cat\n\na dog\n")
    result = run_here(capsys, *TINY, "--from-file", str(blank), "--outdir", str(tmp_path / "x"))
    assert result.returncode == 2 and "line 2 is blank" in result.stderr

    before = digests(base_run)
    result = run_here(capsys, *TINY, "--from-file", str(prompt_file), "--repeats", "2", "--limit", "6",
                      "--scale", "3.0", "--outdir", str(base_run))
    assert result.returncode == 2 and "other settings (differing: scale" in result.stderr
    assert digests(base_run) == before


@pytest.mark.parametrize("extra, message", [
    (["--H", "99968", "--W", "99968"], "a run at 99968x99968 with --batch_size 1 (UNet rows doubled for guidance) "
                                       "needs at least "),
    (["--batch_size", "1000000", "--repeats", "200000"], "a run at 64x64 with --batch_size 1000000"),
    (["--seed", "18446744073709551611", "--repeats", "2", "--limit", "6"],
     "--seed must be in 0..18446744073709551610 (this run uses seeds --seed to --seed + 5)"),
    (["--seed", "-1"], "--seed must be in 0..18446744073709551611"),
])
def test_sizes_and_seeds_that_cannot_run_are_refused_before_the_model(prompt_file, tmp_path, capsys, monkeypatch,
                                                                      extra, message):
    monkeypatch.setattr(prompt_set.gen, "load_model", lambda *a, **k: pytest.fail("model built"))
    outdir = tmp_path / "never"
    result = run_here(capsys, *TINY, "--from-file", str(prompt_file), "--outdir", str(outdir), *extra)
    assert result.returncode == 2 and result.stderr.count("error:") == 1 and message in result.stderr, result.stderr
    assert not outdir.exists()


def test_a_checkpoint_of_the_wrong_shape_is_one_line_and_leaves_no_folder(prompt_file, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    from conftest import GOLDEN_CONFIG, GOLDEN_WEIGHTS
    from sdgen.cli import run as run_cli

    weights = load_file(str(GOLDEN_WEIGHTS))
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    weights[key] = torch.zeros(weights[key].shape[0] + 1, *weights[key].shape[1:])
    save_file(weights, str(tmp_path / "wrong.safetensors"))
    outdir = tmp_path / "new" / "images"
    args = ["--config", str(GOLDEN_CONFIG), "--ckpt", str(tmp_path / "wrong.safetensors"), *TINY[1:],
            "--from-file", str(prompt_file), "--limit", "1", "--outdir", str(outdir)]
    assert run_cli(SAMPLE.main, args, resumable=True) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint does not fit the model config:") and "Traceback" not in err
    assert f"{key}: checkpoint [33, 32, 3, 3] vs config [32, 32, 3, 3]" in err
    assert not (tmp_path / "new").exists()


def test_nan_latents_fail_before_any_image_is_written(prompt_file, tmp_path, capsys):
    from conftest import GOLDEN_CONFIG
    from sdgen.cli import run as run_cli
    from test_txt2img import nan_checkpoint

    ckpt = nan_checkpoint(tmp_path / "nan.safetensors")
    outdir = tmp_path / "out"
    args = ["--config", str(GOLDEN_CONFIG), "--ckpt", str(ckpt), *TINY[1:], "--from-file", str(prompt_file),
            "--limit", "2", "--outdir", str(outdir)]
    assert run_cli(SAMPLE.main, args, resumable=True) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "NaN or infinite values" in err and "Traceback" not in err
    assert not outdir.exists() or not list(outdir.glob("*.png"))
    assert not (outdir / "manifest.json").exists()


def test_an_empty_or_truncated_png_is_made_again_on_resume(base_run, prompt_file, tmp_path, capsys):
    outdir = tmp_path / "resume"
    outdir.mkdir()
    for name in [*names(6), "manifest.json"]:
        (outdir / name).write_bytes((base_run / name).read_bytes())
    (outdir / "000002.png").write_bytes(b"")
    (outdir / "000004.png").write_bytes((base_run / "000004.png").read_bytes()[:100])
    result = run_here(capsys, *TINY, "--from-file", str(prompt_file), "--repeats", "2", "--limit", "6",
                      "--outdir", str(outdir))
    assert result.returncode == 0, result.stderr
    assert "2 image(s) are not complete PNG files and are made again: 000002.png, 000004.png" in result.stdout
    assert "generated 2 images, 6 of 6" in result.stdout
    for name in names(6):
        assert (outdir / name).read_bytes() == (base_run / name).read_bytes(), name
    m = manifest(outdir)
    assert [r["generated"] for r in m["runs"]] == [6, 2] and m["count"] == 6 and m["complete"]


def test_runs_sharing_a_folder_each_add_their_run_to_the_manifest(prompt_file, tmp_path, monkeypatch):
    """Run B starts and ends while run A samples (both found the folder empty): A's manifest keeps B's run."""
    import torch

    from sdgen.image_jobs import run_image_job
    from sdgen.sharding import DistInfo

    outdir = tmp_path / "shared"
    parse = lambda limit: SAMPLE.job_from_args(SAMPLE.resolve_model_args(SAMPLE.build_parser().parse_args(  # noqa
        [*TINY, "--from-file", str(prompt_file), "--limit", str(limit), "--outdir", str(outdir)])))
    job_a, job_b = parse(2), parse(3)
    make_images = prompt_set.PromptSetJob.make_images
    order = []

    def make_a_while_b_runs(self, model, todo, progress=True):
        if self.limit == 2:
            order.append("A samples")
            run_image_job(job_b, DistInfo(), torch.device("cpu"), progress=False)
            order.append("B done")
        return make_images(self, model, todo, progress)

    monkeypatch.setattr(prompt_set.PromptSetJob, "make_images", make_a_while_b_runs)
    run_image_job(job_a, DistInfo(), torch.device("cpu"), progress=False)
    assert order == ["A samples", "B done"]
    m = manifest(outdir)
    assert [r["generated"] for r in m["runs"]] == [3, 2]  # B's run, then A's (it made 000000 and 000001 again)
    assert m["count"] == 2 and m["total"] == 2 and m["complete"]
    assert sorted(p.name for p in outdir.iterdir()) == [*names(3), "manifest.json"]
