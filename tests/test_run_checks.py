"""The checks every front end shares before any model is built (sdgen.settings.RunSettings.problems): the memory
a run needs (sdgen.memory), the seed range, a method that sets its own steps, prompts longer than CLIP reads;
and the output helpers that keep concurrent or failed runs from losing or faking work (sdgen.locks, the PNG
check of a resumed folder, folders removed when a run fails before writing)."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO_ROOT
from sdgen import generate as gen
from sdgen import settings as run_settings
from sdgen.images import atomic_save_png, is_complete_png, made_folder
from sdgen.locks import LockHeld, exclusive_lock
from sdgen.memory import GIB, estimate_run_memory
from sdgen.methods import parse_method
from sdgen.prompts import long_prompt_warning
from sdgen.settings import MAX_SEED, RunSettings, SettingFlags

SD15 = gen.model_geometry(gen.read_config("configs/stable-diffusion/v1-inference.yaml"))
SDXL = gen.model_geometry(gen.read_config("configs/stable-diffusion/sd_xl_base.yaml"))


# --- memory -------------------------------------------------------------------------------------------------

def test_sd15_estimate_is_the_hand_computed_lower_bound():
    """SD 1.5 at 512 x 512, one image with guidance, float32, written out by hand from the architecture
    (channels 320 / 640 / 1280 / 1280, 2 ResBlocks a level, attention on the first three; VAE decoder channels
    128 * [1, 2, 4, 4], its full-resolution level fed from the 256-channel level above)."""
    rows, b = 2, 4
    level0 = rows * 64 * 64 * (2 * 320 + 17 * 320) * b  # skips of level 0 + the GEGLU feed-forward's working set
    level1 = rows * 32 * 32 * (320 + 2 * 640 + 17 * 640) * b
    assert level0 > level1
    decode = 2 * 256 * 512 * 512 * b
    latents = 3 * 4 * 64 * 64 * 4
    estimate = estimate_run_memory(SD15, 512, 512, batch=1, guided=True, precision="full")
    assert (estimate.unet, estimate.decode, estimate.latents) == (level0, decode, latents)
    assert estimate.total == latents + decode == 537_067_520
    # guidance doubles the UNet's rows only; autocast halves the values; the batch and the pixels scale it
    unguided = estimate_run_memory(SD15, 512, 512, batch=1, guided=False, precision="full")
    assert (unguided.unet, unguided.decode) == (level0 // 2, decode)
    half = estimate_run_memory(SD15, 512, 512, batch=1, guided=True, precision="autocast")
    assert (half.unet, half.decode) == (level0 // 2, decode // 2)
    big = estimate_run_memory(SD15, 1024, 1024, batch=3, guided=True, precision="full")
    assert (big.unet, big.decode) == (12 * level0, 12 * decode)


def test_sdxl_has_no_attention_at_full_resolution_and_decodes_in_float32():
    assert SDXL.level_attention == (False, True, True) and SDXL.level_channels == (320, 640, 1280)
    estimate = estimate_run_memory(SDXL, 1024, 1024, batch=1, guided=True, precision="autocast")
    level1 = 2 * 64 * 64 * (320 + 2 * 640 + 17 * 640) * 2
    assert estimate.unet == level1
    assert estimate.decode == 2 * 256 * 1024 * 1024 * 4  # float32 although the UNet runs in float16


def test_a_run_that_needs_more_than_the_free_memory_is_refused(monkeypatch):
    monkeypatch.setattr(run_settings, "free_memory", lambda device: (GIB, f"free on {device} (test)"))
    flags = SettingFlags(size="--H and --W", batch="--n_samples")
    fits = RunSettings(height=512, width=512, batch=1, precision="full", geometry=SD15, device="cpu")
    assert fits.problems(flags) == []
    too_big = RunSettings(height=512, width=512, batch=3, precision="full", geometry=SD15, device="cpu")
    (problem,) = too_big.problems(flags)
    assert problem.startswith("a run at 512x512 with --n_samples 3 (UNet rows doubled for guidance) needs at "
                              "least 1.5 GiB (UNet activations 570 MiB, VAE decode 1.5 GiB")
    assert problem.endswith("more than the 1 GiB free on cpu (test); lower --H and --W or --n_samples")
    assert RunSettings(height=512, width=512, batch=3, geometry=SD15).problems(flags) == []  # no device: unchecked


PEAK = """
import json, sys
from pathlib import Path
import torch
from sdgen import generate as gen
from sdgen.memory import estimate_run_memory

def rss(field):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field))
    return int(line.split()[1]) * 1024

torch.set_num_threads(1)
model = gen.build_demo_model("cpu")
geometry = gen.model_geometry(gen.read_config(gen.TINY_CONFIG))
def run(side, batch):
    cond = gen.encode_prompts(model, ["a cat"] * batch, 7.5, "full")
    x_T = gen.start_noise(list(range(batch)), gen.latent_shape(geometry, side, side))
    return gen.decode(model, gen.sample_latents(model, cond, x_T, sampler="ddim", steps=1).latents)
run(64, 1)  # warm-up: the first call's allocations are not the run's
before = rss("VmRSS")
run(256, 2)
print(json.dumps({"peak": rss("VmHWM") - before, "estimate": estimate_run_memory(geometry, 256, 256, 2, True,
                                                                                 "full").total}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak from /proc")
def test_the_estimate_is_below_what_a_run_really_holds():
    """A sampler call and decode of the demo model at 256 x 256, batch 2: the resident-set peak grows by more
    than the estimate (measured: about 5x; the attention matrices, norms' copies and the allocator's cache
    are left out of the bound)."""
    import json

    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "sd1"), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", PEAK], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    assert numbers["estimate"] == 2 * 2 * 32 * 256 * 256 * 4 + 3 * 2 * 4 * 32 * 32 * 4  # VAE decode + latents
    assert numbers["peak"] > numbers["estimate"]


# --- seeds --------------------------------------------------------------------------------------------------

def test_seeds_must_fit_torch_generators_for_every_image():
    generator = torch.Generator()
    generator.manual_seed(MAX_SEED)  # the largest seed torch takes ...
    with pytest.raises(ValueError, match="Overflow"):
        generator.manual_seed(MAX_SEED + 1)  # ... and one more overflows
    assert RunSettings(seed=MAX_SEED).problems() == []
    assert RunSettings(seed=MAX_SEED - 4, seed_count=5).problems() == []
    (problem,) = RunSettings(seed=MAX_SEED - 3, seed_count=5).problems()
    assert problem == (f"--seed must be in 0..{MAX_SEED - 4} (this run uses seeds --seed to --seed + 4): torch's "
                       f"generators take seeds up to 2**64 - 1, got {MAX_SEED - 3}")
    assert RunSettings(seed=-1).problems()[0].startswith(f"--seed must be in 0..{MAX_SEED}:")


# --- a method's own sampling ---------------------------------------------------------------------------------

def test_a_method_with_its_own_steps_says_what_it_runs():
    flags = SettingFlags(sampler="--plms", steps="--ddim_steps")
    asked = RunSettings(sampler="plms", steps=5)
    ddim10 = parse_method("ddim10")
    run = asked.for_method(ddim10, flags)
    assert (run.sampler, run.steps) == ("ddim", 10)
    assert run.method_note(ddim10, flags) == ("ddim10 sets its own sampling: it runs the ddim sampler, not plms "
                                              "(--plms) and 10 steps, not --ddim_steps 5")
    assert RunSettings(sampler="ddim", steps=10).for_method(ddim10).method_note(ddim10) is None
    original = parse_method("original")
    assert asked.for_method(original).method_note(original) is None


# --- prompts longer than CLIP reads ----------------------------------------------------------------------------

def test_long_prompts_are_counted_with_the_clip_tokenizer(monkeypatch):
    from ldm.modules.encoders.modules import CLIPTokenizerHF

    long = "a very detailed photograph of " + "a red bicycle and " * 20 + "a cat"
    tokens = len(CLIPTokenizerHF().encode(long)) + 2
    assert tokens > 77
    # what the encoder reads of it: its first 75 tokens between start and end
    ids = CLIPTokenizerHF()([long])[0]
    assert ids.shape == (77,) and ids[1:76].tolist() == CLIPTokenizerHF().encode(long)[:75]
    warning = long_prompt_warning(["a cat", long, long, "word " * 74])
    assert warning == (f"1 of 3 prompts are longer than the text encoder's 77 tokens (the longest has {tokens} "
                       f"tokens): only their first 75 tokens are read, the rest is cut off")
    assert long_prompt_warning(["word " * 74]) is None  # 75 words + start + end = 77 tokens: it fits
    # prompts of at most 75 bytes are not even tokenized
    monkeypatch.setattr(CLIPTokenizerHF, "encode", lambda self, text: pytest.fail("tokenized a short prompt"))
    assert long_prompt_warning(["x" * 75, "a photograph of an astronaut riding a horse"]) is None


# --- outputs ----------------------------------------------------------------------------------------------------

def test_a_complete_png_is_told_from_an_empty_or_truncated_one(tmp_path):
    import numpy as np

    good = tmp_path / "000000.png"
    atomic_save_png(np.zeros((8, 8, 3), dtype=np.uint8), good)
    data = good.read_bytes()
    assert is_complete_png(good)
    for name, content in (("empty.png", b""), ("half.png", data[:len(data) // 2]), ("text.png", b"hello" * 10)):
        (tmp_path / name).write_bytes(content)
        assert not is_complete_png(tmp_path / name), name
    assert not is_complete_png(tmp_path / "missing.png") and not is_complete_png(tmp_path)


def test_a_folder_made_for_a_failed_block_is_removed_only_while_empty(tmp_path):
    target = tmp_path / "a" / "b" / "c"
    with pytest.raises(RuntimeError):
        with made_folder(target):
            assert target.is_dir()
            raise RuntimeError("model failed to load")
    assert not (tmp_path / "a").exists()
    with pytest.raises(KeyboardInterrupt):
        with made_folder(target):
            (target / "000000.png").write_bytes(b"image")
            raise KeyboardInterrupt
    assert (target / "000000.png").read_bytes() == b"image"
    existing = tmp_path / "kept"
    existing.mkdir()
    with pytest.raises(RuntimeError):
        with made_folder(existing):
            raise RuntimeError
    assert existing.is_dir()


HOLD = ("import sys, time\nfrom sdgen.locks import exclusive_lock\n"
        "with exclusive_lock(sys.argv[1], wait=False):\n    print('held', flush=True)\n    time.sleep(120)\n")


def test_a_lock_held_by_a_live_process_is_refused_and_a_dead_ones_taken_over(tmp_path):
    path = tmp_path / "search.lock"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "sd1"))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld) as held:
            with exclusive_lock(path, wait=False):
                pytest.fail("two processes held one lock")
        assert held.value.pid == holder.pid
        holder.send_signal(signal.SIGKILL)  # dies holding it: the kernel drops the lock, the file stays
        holder.wait(timeout=30)
        assert path.read_text().strip() == str(holder.pid)
        with exclusive_lock(path, wait=False):
            assert path.read_text().strip() == str(os.getpid())
        assert not path.exists()
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_a_waiting_lock_is_taken_once_the_holder_lets_go(tmp_path):
    path = tmp_path / ".manifest.lock"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "sd1"))
    hold_briefly = HOLD.replace("time.sleep(120)", "time.sleep(1)")
    holder = subprocess.Popen([sys.executable, "-c", hold_briefly, str(path)], env=env, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.perf_counter()
        with exclusive_lock(path, wait=True):  # waits until the holder's second is over
            assert time.perf_counter() - started > 0.5
            assert path.read_text().strip() == str(os.getpid())
    finally:
        holder.kill()
        holder.wait(timeout=30)
