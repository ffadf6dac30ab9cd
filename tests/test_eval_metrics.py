"""Metrics: sdeval.evaluate (in memory and folders) and its command line (sdeval.cli, scripts/eval_fid.py)
against direct computations, on tiny synthetic folders.

The Inception network is randomly initialised (`--random-inception-for-tests SEED`), so the
values test the plumbing and the formulas, not the real metric. Images are 32x32 PNGs
(resized to 299x299 by the loader); a random Inception forward is ~0.3 s per image on one CPU
thread, so the folders hold 4 images each.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from scipy.special import softmax
from scipy.stats import entropy

from conftest import REPO_ROOT
from sdeval import cli as eval_cli
from sdeval.evaluate import clip_scores, folder_inception_outputs, inception_outputs, load_clip
from sdeval.fid import feature_statistics, frechet_distance
from sdeval.images import list_images
from sdeval.inception import build_fid_inception
from sdeval.inception_score import inception_score
from sdgen.runtime import UsageError, set_threads

REPO = REPO_ROOT
SEED = 0
BATCH = 2
N_IMAGES = 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread: on a shared 2-core machine, 2 OpenMP threads make the forward ~10x slower."""
    before = set_threads(None)
    set_threads(1)
    yield
    set_threads(before)


def _write_folder(folder, images):
    folder.mkdir()
    for k, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{k:05d}.png")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(N_IMAGES)]
    ramp = np.linspace(0, 1, 32)[None, :, None] * np.linspace(0.2, 1, 3)[None, None, :]
    smooth = [(255 * np.clip(ramp * rng.uniform(0.3, 1) + 0.1 * rng.random((32, 1, 1)), 0, 1)).astype(np.uint8)
              for _ in range(N_IMAGES)]  # colour ramps: a different distribution from the noise
    same = [noise[0]] * N_IMAGES
    return {
        "a": _write_folder(root / "a", noise),
        "b": _write_folder(root / "b", smooth),
        "same": _write_folder(root / "same", same),
        "root": root,
    }


@pytest.fixture(scope="module")
def features(folders):
    """Features extracted in the test, through the same randomly initialised network."""
    net = build_fid_inception(random_init_seed=SEED)
    out = {}
    for name in ("a", "b"):
        out[name] = folder_inception_outputs(list_images(folders[name]), net, batch_size=BATCH, progress=False)
    return out


def _run(args, results=None):
    argv = [*map(str, args), "--random-inception-for-tests", str(SEED), "--batch-size", str(BATCH),
            "--num-workers", "0", "--device", "cpu", "--no-progress"]
    if results is not None:
        argv += ["--results", str(results)]
    return eval_cli.evaluate_folder(argv)


@pytest.fixture(scope="module")
def fid_ab(folders):
    results = folders["root"] / "results.jsonl"
    _run(["--samples", folders["a"], "--ref", folders["b"], "--metrics", "fid,is", "--is-splits", "1"], results)
    lines = results.read_text().splitlines()
    return {rec["metric"]: rec for rec in map(json.loads, lines)}


def exact_fid(x1, x2):
    """FID from features (N, D) with N < D: Tr sqrt(S1 S2) is the nuclear norm of A1 A2^T, where
    S = A^T A, A = centred features / sqrt(N - 1). Exact, no matrix square root needed."""
    a1 = (x1 - x1.mean(0)) / np.sqrt(len(x1) - 1)
    a2 = (x2 - x2.mean(0)) / np.sqrt(len(x2) - 1)
    d = x1.mean(0) - x2.mean(0)
    tr_sqrt = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()
    return d @ d + (a1 * a1).sum() + (a2 * a2).sum() - 2 * tr_sqrt


# --- FID ---

def test_features_equal_pytorch_fid_inceptionv3(folders, monkeypatch):
    """Our loader + network = pytorch-fid's InceptionV3 (resize inside, [0,1] -> [-1,1], pool3),
    given the same weights. pytorch-fid would download its weights, so its builder is pointed
    at our randomly initialised architecture for the test."""
    import pytorch_fid.inception as pfi
    from torchvision.transforms.functional import to_tensor

    ours = build_fid_inception(random_init_seed=SEED)
    monkeypatch.setattr(pfi, "fid_inception_v3", lambda: ours.net)
    theirs = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    paths = list_images(folders["a"])[:2]
    with torch.no_grad():
        x = torch.stack([to_tensor(Image.open(p).convert("RGB")) for p in paths])  # 32x32, as pytorch-fid loads
        expected = theirs(x)[0].flatten(1).double().numpy()
    pool, _ = folder_inception_outputs(paths, ours, batch_size=2, progress=False)
    np.testing.assert_allclose(pool, expected, rtol=1e-5, atol=1e-6)


def test_fid_matches_direct_computation(fid_ab, features, folders):
    rec = fid_ab["fid"]
    expected = exact_fid(features["a"][0], features["b"][0])
    assert expected > 1e-2  # the two folders really differ
    assert rec["value"] == pytest.approx(expected, rel=1e-6)
    assert rec["num_samples"] == N_IMAGES and rec["num_reference"] == N_IMAGES
    assert rec["reference"] == str(folders["b"]) and rec["samples"] == str(folders["a"])
    assert rec["settings"]["image_size"] == 299 and "bilinear" in rec["settings"]["resize"]
    assert "RANDOM" in rec["settings"]["weights"] and rec["date"]


def test_frechet_distance_matches_scipy_sqrtm_full_rank():
    rng = np.random.default_rng(1)
    x1, x2 = rng.normal(size=(200, 16)), rng.normal(1.0, 2.0, size=(300, 16)) @ rng.normal(size=(16, 16))
    (m1, s1), (m2, s2) = feature_statistics(x1), feature_statistics(x2)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = (m1 - m2) @ (m1 - m2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-9)


def test_fid_of_identical_folders_is_zero(folders):
    (rec,) = _run(["--samples", folders["a"], "--ref", folders["a"]])
    # Exactly 0 in exact arithmetic; the eigendecompositions of 2048x2048 rank-3 covariances
    # leave rounding noise (~1e-10 here), far below the 1e-3 bound.
    assert abs(rec["value"]) < 1e-3


def test_save_stats_then_npz_reference_gives_the_same_fid(fid_ab, features, folders, tmp_path):
    stats = tmp_path / "b.npz"
    assert _run(["--samples", folders["b"], "--save-stats", stats]) == []  # no --ref: statistics only
    with np.load(stats) as f:
        assert sorted(f.keys()) == ["mu", "sigma"]
        mu, sigma = feature_statistics(features["b"][0])
        np.testing.assert_allclose(f["mu"], mu, rtol=1e-12)
        np.testing.assert_allclose(f["sigma"], sigma, rtol=1e-12, atol=1e-15)
    (rec,) = _run(["--samples", folders["a"], "--ref", stats])
    assert rec["value"] == pytest.approx(fid_ab["fid"]["value"], rel=1e-9)
    assert rec["reference"] == str(stats) and rec["num_reference"] is None


def test_missing_inception_weights_is_one_clear_error(folders, tmp_path):
    missing = tmp_path / "weights" / "pt_inception-2015-12-05-6726825d.pth"
    results = tmp_path / "results.jsonl"
    cmd = [sys.executable, str(REPO / "scripts" / "eval_fid.py"), "--samples", str(folders["a"]),
           "--ref", str(folders["b"]), "--inception-weights", str(missing), "--results", str(results)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO / "sd1")))
    assert proc.returncode != 0
    assert str(missing) in proc.stderr and "Inception weights not found" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not results.exists()


def test_all_input_problems_reported_before_any_work(folders, tmp_path):
    results = tmp_path / "results.jsonl"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError) as e:
        eval_cli.evaluate_folder(["--samples", str(empty), "--metrics", "fid,clip", "--inception-weights",
                                  str(tmp_path / "inc.pth"), "--clip-weights", str(tmp_path / "clip.bin"),
                                  "--results", str(results)])
    msg = str(e.value)
    for part in ("no images", "fid needs --ref", "inc.pth", "clip.bin", "clip/imagereward need --prompts"):
        assert part in msg
    assert not results.exists()
    with pytest.raises(UsageError, match="unknown"):
        eval_cli.evaluate_folder(["--samples", str(folders["a"]), "--metrics", "fid,kid"])


def test_in_memory_images_score_as_their_files(folders, features):
    """Decoded samples held in memory (float in [-1, 1] -> uint8 tensor, no PIL step) give exactly the
    Inception outputs of the same pixels read from PNG files."""
    from sdgen.images import to_uint8_tensor

    files = list_images(folders["a"])
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB")).copy()).permute(2, 0, 1)
                          for p in files])
    decoded = pixels.float() / 127.5 - 1.0  # what a VAE decoder returns
    assert torch.equal(to_uint8_tensor(decoded), pixels)
    net = build_fid_inception(random_init_seed=SEED)
    pool, logits = inception_outputs(to_uint8_tensor(decoded), net, batch_size=BATCH)
    np.testing.assert_array_equal(pool, features["a"][0])
    np.testing.assert_array_equal(logits, features["a"][1])
    pil_pool, _ = inception_outputs([Image.open(p) for p in files], net, batch_size=BATCH)
    np.testing.assert_array_equal(pil_pool, features["a"][0])


def _corrupt_samples(tmp_path, folders):
    bad = tmp_path / "bad"
    bad.mkdir()
    for path in list_images(folders["a"]):
        (bad / path.name).write_bytes(path.read_bytes())
    truncated = (bad / "00001.png").read_bytes()
    (bad / "00001.png").write_bytes(truncated[:len(truncated) // 2])
    return ["--samples", bad, "--ref", folders["b"]], "00001.png"


def _garbage_npz(tmp_path, folders):
    ref = tmp_path / "ref.npz"
    ref.write_bytes(b"\x80\x04garbage, not an npz" * 8)
    return ["--samples", folders["a"], "--ref", ref], "is not an .npz file of Inception statistics"


def _truncated_npz(tmp_path, folders):
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))
    ref.write_bytes(ref.read_bytes()[:1000])  # the zip's central directory is gone: BadZipFile
    return ["--samples", folders["a"], "--ref", ref], "is not an .npz file of Inception statistics"


def _nan_statistics(tmp_path, folders):
    ref = tmp_path / "ref.npz"
    sigma = np.eye(2048)
    sigma[3, 3] = np.nan
    np.savez(ref, mu=np.zeros(2048), sigma=sigma)
    return ["--samples", folders["a"], "--ref", ref], "sigma holds 1 NaN or inf values"


def _results_under_a_file(tmp_path, folders):
    (tmp_path / "file").write_text("x")
    return ["--samples", folders["a"], "--ref", folders["b"], "--results", tmp_path / "file" / "r.jsonl"], \
        "is a file, not a folder"


def _stats_to_a_folder(tmp_path, folders):
    (tmp_path / "stats.npz").mkdir()
    return ["--samples", folders["a"], "--save-stats", tmp_path / "stats.npz"], "--save-stats"


@pytest.mark.parametrize("make_case", [_corrupt_samples, _garbage_npz, _truncated_npz, _nan_statistics,
                                       _results_under_a_file, _stats_to_a_folder])
def test_bad_input_is_one_line_before_any_work(make_case, folders, tmp_path, capsys, monkeypatch):
    import sdeval.inception

    def no_network(*args, **kwargs):
        raise AssertionError("the Inception network was built before the inputs were checked")

    monkeypatch.setattr(sdeval.inception, "build_fid_inception", no_network)
    args, message = make_case(tmp_path, folders)
    results = tmp_path / "out" / "results.jsonl"
    before = sorted(tmp_path.rglob("*"))
    argv = [*map(str, args), "--random-inception-for-tests", "0", "--num-workers", "0", "--no-progress"]
    if "--results" not in argv:
        argv += ["--results", str(results)]
    assert eval_cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "allow_pickle" not in err and "Traceback" not in err
    assert sorted(tmp_path.rglob("*")) == before  # no output file, no folder


def _text_file(path):
    path.write_text("hello, not a checkpoint\n")
    return "unreadable as a PyTorch state dict"


def _sd_checkpoint(path):
    torch.save({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, path)
    return "566 missing tensors (e.g. Conv2d_1a_3x3.conv.weight); 1 unexpected tensors"  # none of its names


def _nested_checkpoint(path):
    torch.save({"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4)}, "global_step": 10}, path)
    return "not a state dict of tensors"


@pytest.mark.parametrize("write", [_text_file, _sd_checkpoint, _nested_checkpoint])
def test_wrong_inception_weights_file_is_one_line(write, folders, tmp_path, capsys):
    """A weights file that is not pytorch-fid's .pth (a text file, an SD checkpoint) is named in one line
    before anything is computed or written."""
    weights = tmp_path / "pt_inception.pth"
    expected = write(weights)
    results = tmp_path / "results.jsonl"
    argv = ["--samples", str(folders["a"]), "--ref", str(folders["b"]), "--inception-weights", str(weights),
            "--results", str(results), "--num-workers", "0", "--no-progress"]
    assert eval_cli.main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(weights) in lines[0], lines
    assert "is not pytorch-fid's FID Inception weights" in lines[0] and expected in lines[0]
    assert not results.exists()


def test_save_stats_keeps_an_existing_file_without_force(folders, features, tmp_path, capsys):
    stats = tmp_path / "stats.npz"
    stats.write_bytes(b"an older statistics file")
    with pytest.raises(UsageError, match=f"--save-stats: {stats} already exists; pass --force to overwrite it"):
        _run(["--samples", folders["a"], "--save-stats", stats])
    assert stats.read_bytes() == b"an older statistics file"
    assert _run(["--samples", folders["a"], "--save-stats", stats, "--force"]) == []
    with np.load(stats) as f:
        np.testing.assert_allclose(f["mu"], feature_statistics(features["a"][0])[0], rtol=1e-12)
    assert not list(tmp_path.glob(".*.tmp"))


def test_nan_features_or_values_never_make_a_results_line(folders, tmp_path):
    """NaN features are refused by the statistics; a NaN value is refused by the record (never invalid JSON)."""
    features = np.ones((3, 8))
    features[1, 2] = np.nan
    with pytest.raises(ValueError, match="1 of 3 Inception feature rows hold NaN or inf"):
        feature_statistics(features)
    results = tmp_path / "results.jsonl"
    args = eval_cli.build_parser().parse_args(["--samples", str(folders["a"]), "--results", str(results)])
    with pytest.raises(ValueError, match="not JSON compliant"):
        eval_cli.Results(args).add("fid", float("nan"), 4, {})
    assert not results.exists()


def test_help_examples_keep_their_line_continuations(capsys):
    with pytest.raises(SystemExit):
        eval_cli.main(["--help"])
    out = capsys.readouterr().out
    assert "--save-stats coco-ref.npz \\\n        --inception-weights" in out


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    def interrupted(argv=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(eval_cli, "evaluate_folder", interrupted)
    monkeypatch.setattr(sys, "argv", ["eval_fid.py", "--samples", "x"])
    assert eval_cli.cli() == 130
    assert capsys.readouterr().err.strip() == "interrupted"


# --- Inception Score ---

def test_inception_score_known_values():
    n = 6
    confident = np.full((n, 10), -50.0)
    confident[np.arange(n), np.arange(n)] = 50.0  # each image sure of its own class
    assert inception_score(confident, splits=1)[0] == pytest.approx(n, rel=1e-9)
    assert inception_score(confident, splits=2)[0] == pytest.approx(n / 2, rel=1e-9)
    assert inception_score(np.zeros((n, 10)), splits=3) == pytest.approx((1.0, 0.0), abs=1e-12)


def test_inception_score_matches_direct_computation(fid_ab, features):
    logits = features["a"][1]
    p = softmax(logits, axis=1)
    expected = np.exp(np.mean([entropy(pi, p.mean(0)) for pi in p]))
    assert expected - 1 > 1e-6  # distinct images: the score is above 1
    assert fid_ab["is"]["value"] - 1 == pytest.approx(expected - 1, rel=1e-6)
    assert fid_ab["is"]["settings"]["splits"] == 1


def test_inception_score_of_identical_images_is_one(folders):
    (rec,) = _run(["--samples", folders["same"], "--metrics", "is", "--is-splits", "2"])
    assert rec["value"] == pytest.approx(1.0, abs=1e-5)
    assert rec["num_samples"] == N_IMAGES


# --- CLIP score ---

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def test_clip_score_matches_independent_computation(folders, tmp_path):
    import open_clip

    config = tmp_path / "sdeval-test-tiny-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(1)  # a seed whose cosines have both signs, so the clamp matters
    model = open_clip.create_model("sdeval-test-tiny-clip", pretrained=None).eval()
    weights = tmp_path / "tiny-clip.pt"
    torch.save(model.state_dict(), weights)
    prompts = ["a photo of a cat", "static noise", "a red car on a street", "two dogs", "unused line"]
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(prompts) + "\n")

    (rec,) = eval_cli.evaluate_folder(["--samples", str(folders["a"]), "--metrics", "clip", "--clip-arch",
                                       str(config), "--clip-weights", str(weights), "--prompts", str(prompt_file),
                                       "--batch-size", "3", "--num-workers", "0", "--device", "cpu",
                                       "--no-progress"])

    preprocess = open_clip.image_transform(32, is_train=False)
    with torch.no_grad():
        images = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in list_images(folders["a"])])
        img = model.encode_image(images).numpy().astype(np.float64)
        txt = model.encode_text(open_clip.tokenize(prompts[:N_IMAGES])).numpy().astype(np.float64)
    cos = (img * txt).sum(1) / np.linalg.norm(img, axis=1) / np.linalg.norm(txt, axis=1)
    per_image = 100 * np.maximum(cos, 0)
    assert (cos < 0).any() and (cos > 0).any()
    assert rec["value"] == pytest.approx(per_image.mean(), rel=1e-5)
    assert rec["num_samples"] == N_IMAGES and rec["settings"]["arch"] == "sdeval-test-tiny-clip"
    # The in-memory API scores the same pixels alike (a uint8 tensor, as decoded samples are).
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB")).copy()).permute(2, 0, 1)
                          for p in list_images(folders["a"])])
    in_memory = clip_scores(load_clip(str(config), weights), pixels, prompts[:N_IMAGES], batch_size=3)
    np.testing.assert_allclose(in_memory, per_image, rtol=1e-5, atol=1e-6)


def test_clip_prompts_must_cover_the_image_indices(folders, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("only one\nand two\n")
    with pytest.raises(UsageError, match="--prompts-cycle"):
        eval_cli.evaluate_folder(["--samples", str(folders["a"]), "--metrics", "clip", "--clip-weights", str(short),
                                  "--prompts", str(short)])
