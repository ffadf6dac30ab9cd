"""Checkpoint layout and loading: the SD 1.x / 2.x key manifests, synthetic checkpoints, and bad files."""
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from conftest import DATA_DIR, GOLDEN_CONFIG, GOLDEN_WEIGHTS, REPO_ROOT
from ldm.checkpoint import CheckpointError, fit_state_dict, read_checkpoint
from ldm.util import instantiate_from_config, load_model_from_config

V1_CONFIG = REPO_ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml"
V2_CONFIG = REPO_ROOT / "configs" / "stable-diffusion" / "v2-inference.yaml"
TEXT = "cond_stage_model.transformer."
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def read_manifest(name):
    """{key: (shape list, dtype name)} from a reference TSV."""
    rows = {}
    for line in (DATA_DIR / name).read_text().splitlines():
        key, shape, dtype = line.split("\t")
        rows[key] = (eval(shape), dtype)
    return rows


def meta_model(config_path):
    with torch.device("meta"):
        return instantiate_from_config(OmegaConf.load(str(config_path)).model)


def checkpoint_naming(key):
    """Our key -> the naming in real checkpoints (transformers 4 `text_model.` level)."""
    if key.startswith(TEXT) and not key.startswith(TEXT + "text_model."):
        return TEXT + "text_model." + key[len(TEXT):]
    return key


@pytest.fixture(scope="module")
def v1_model():
    return meta_model(V1_CONFIG)


@pytest.fixture(scope="module")
def v2_model():
    return meta_model(V2_CONFIG)


def test_v1_layout_matches_manifest(v1_model):
    manifest = read_manifest("sd-v1-state-dict.tsv")
    ours = {checkpoint_naming(k): (list(v.shape), str(v.dtype).replace("torch.", ""))
            for k, v in v1_model.state_dict().items()}
    # The only documented version-dependent difference: position_ids is not a persistent buffer any more.
    expected = {k: v for k, v in manifest.items() if k != POSITION_IDS}
    assert ours == expected
    assert sum(p.numel() for p in v1_model.model.diffusion_model.parameters()) == 859_520_964


def test_v2_layout_matches_manifest(v2_model):
    manifest = read_manifest("sd-v2-state-dict.tsv")
    ours = {k: (list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in v2_model.state_dict().items()}
    assert ours == manifest
    assert sum(p.numel() for p in v2_model.model.diffusion_model.parameters()) == 865_910_724
    assert sum(p.numel() for p in v2_model.cond_stage_model.parameters()) == 354_032_641


def manifest_state_dict(name, extra=None):
    """A state dict of meta tensors with the manifest's keys and shapes (a full-size checkpoint, no memory)."""
    dtypes = {"float32": torch.float32, "int64": torch.int64}
    sd = {k: torch.empty(shape, dtype=dtypes[dtype], device="meta")
          for k, (shape, dtype) in read_manifest(name).items()}
    sd.update(extra or {})
    return sd


@pytest.mark.parametrize("manifest,fixture", [("sd-v1-state-dict.tsv", "v1_model"),
                                              ("sd-v2-state-dict.tsv", "v2_model")])
def test_full_size_checkpoint_layout_fits(manifest, fixture, request):
    model = request.getfixturevalue(fixture)
    sd = manifest_state_dict(manifest)
    fitted, notes = fit_state_dict(model, sd)
    assert set(fitted) == set(model.state_dict())
    assert notes == []


def test_v2_checkpoint_with_v1_config_names_the_mismatch(v1_model):
    with pytest.raises(CheckpointError) as err:
        fit_state_dict(v1_model, manifest_state_dict("sd-v2-state-dict.tsv"), path="sd2.ckpt")
    message = str(err.value)
    assert "attn2.to_k.weight: checkpoint [320, 1024] vs config [320, 768]" in message
    assert "v2-inference.yaml" in message
    assert "missing" in message


@pytest.fixture(scope="module")
def golden_sd():
    return read_checkpoint(GOLDEN_WEIGHTS)


def perturbed_ema(sd):
    """model_ema.* copies of the UNet weights, shifted so that loading them is visible."""
    ema = {}
    for k, v in sd.items():
        if k.startswith("model.diffusion_model."):
            ema["model_ema." + k[len("model."):].replace(".", "")] = v + 0.5
    ema["model_ema.decay"] = torch.tensor(0.9999)
    ema["model_ema.num_updates"] = torch.tensor(10, dtype=torch.int32)
    return ema


def write(sd, path, nested):
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save({"state_dict": sd, "global_step": 470000} if nested else sd, str(path))


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
@pytest.mark.parametrize("with_ema", [False, True])
@pytest.mark.parametrize("with_position_ids", [False, True])
def test_synthetic_checkpoints_load_completely(tmp_path, golden_sd, suffix, with_ema, with_position_ids):
    sd = {k: v for k, v in golden_sd.items() if not k.endswith("position_ids")}
    if with_position_ids:
        sd[POSITION_IDS] = torch.arange(77)[None]
    if with_ema:
        sd.update(perturbed_ema(golden_sd))
    path = tmp_path / f"model{suffix}"
    write(sd, path, nested=True)
    config = OmegaConf.load(str(GOLDEN_CONFIG))
    model = load_model_from_config(config, str(path))
    ours = model.state_dict()
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    assert torch.equal(ours[key], golden_sd[key])
    text_key = "embeddings.token_embedding.weight"
    assert torch.equal(model.cond_stage_model.transformer.get_input_embeddings().weight,
                       golden_sd[TEXT + "text_model." + text_key])
    if with_ema:
        ema_model = load_model_from_config(config, str(path), use_ema=True)
        assert torch.equal(ema_model.state_dict()[key], golden_sd[key] + 0.5)
        vae_key = "first_stage_model.decoder.conv_out.weight"
        assert torch.equal(ema_model.state_dict()[vae_key], golden_sd[vae_key])


def test_flat_ckpt_and_ema_request_without_ema(tmp_path, golden_sd, capsys):
    path = tmp_path / "flat.ckpt"
    write(golden_sd, path, nested=False)
    model = load_model_from_config(OmegaConf.load(str(GOLDEN_CONFIG)), str(path), use_ema=True, verbose=True)
    assert "has none" in capsys.readouterr().out
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(model.state_dict()[key], golden_sd[key])


def pickled_as(qualified_name, cls):
    """Make instances of `cls` pickle under `qualified_name` (a module that need not be installed)."""
    module_name, _, class_name = qualified_name.rpartition(".")
    cls.__module__, cls.__qualname__ = module_name, class_name
    return cls


def save_with_fake_modules(obj, path, classes):
    """torch.save `obj` whose classes pretend to live in other (possibly absent) modules."""
    import sys
    import types

    added = []
    for cls in classes:
        parts = cls.__module__.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if name not in sys.modules:
                sys.modules[name] = types.ModuleType(name)
                added.append(name)
        setattr(sys.modules[cls.__module__], cls.__qualname__, cls)
    try:
        torch.save(obj, str(path))
    finally:
        for name in added:
            del sys.modules[name]


def test_lightning_training_checkpoint_layout_loads(tmp_path, golden_sd):
    """The layout of released SD .ckpt files: Lightning's ModelCheckpoint (as a dict key and as an instance,
    as old and new Lightning versions write it), numpy scalars and plain values beside the state dict."""
    import numpy as np

    ModelCheckpoint = pickled_as("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
                                 type("ModelCheckpoint", (), {}))
    callback = ModelCheckpoint()
    callback.best_model_path = "logs/last.ckpt"
    data = {"epoch": 6, "global_step": 470000, "pytorch-lightning_version": "1.4.2", "state_dict": golden_sd,
            "callbacks": {ModelCheckpoint: {"monitor": None, "best_model_score": np.float64(0.25),
                                            "current_score": np.float32(1.5)}, "cb": callback}}
    path = tmp_path / "train.ckpt"
    save_with_fake_modules(data, path, [ModelCheckpoint])
    sd = read_checkpoint(path)
    assert set(sd) == set(golden_sd)
    key = "model.diffusion_model.out.2.weight"
    assert torch.equal(sd[key], golden_sd[key])


class RunsString:
    """A pickled object that runs Python code when loaded, through numpy's test helper."""

    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        from numpy.testing._private.utils import runstring

        return runstring, (self.code, {})


class ExecsSource:
    """A pickled object that runs Python code when loaded, through torch.fx's source executor."""

    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        from torch.fx.graph_module import _exec_with_source

        return _exec_with_source, (self.code, {}, "payload")


def payload_checkpoint(tmp_path, golden_sd, payload_class):
    marker = tmp_path / "pwned"
    code = f"open({str(marker)!r}, 'w').write('ran')"
    path = tmp_path / f"{payload_class.__name__}.ckpt"
    torch.save({"state_dict": golden_sd, "evil": payload_class(code)}, str(path))
    return path, marker


@pytest.mark.parametrize("payload_class", [RunsString, ExecsSource])
def test_checkpoint_code_is_never_run(tmp_path, golden_sd, payload_class):
    path, marker = payload_checkpoint(tmp_path, golden_sd, payload_class)
    with pytest.raises(CheckpointError, match="refused to load .* could run code") as err:
        read_checkpoint(path)
    assert not marker.exists()
    assert ("runstring" in str(err.value)) == (payload_class is RunsString)
    assert ("_exec_with_source" in str(err.value)) == (payload_class is ExecsSource)


def test_unknown_pickled_class_is_refused_and_named(tmp_path, golden_sd):
    Unknown = pickled_as("fake_lightning_callbacks.Unknown", type("Unknown", (), {}))
    path = tmp_path / "train.ckpt"
    save_with_fake_modules({"state_dict": golden_sd, "callbacks": {"cb": Unknown()}}, path, [Unknown])
    with pytest.raises(CheckpointError, match="fake_lightning_callbacks.Unknown"):
        read_checkpoint(path)


def test_txt2img_refuses_a_payload_checkpoint(tmp_path, golden_sd, capsys):
    from sdgen.cli import txt2img

    path, marker = payload_checkpoint(tmp_path, golden_sd, RunsString)
    outdir = tmp_path / "out"
    code = txt2img.main(["--config", str(GOLDEN_CONFIG), "--ckpt", str(path), "--outdir", str(outdir),
                         "--H", "64", "--W", "64", "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1"])
    err = capsys.readouterr().err
    assert code != 0 and "refused to load" in err and "Traceback" not in err
    assert not marker.exists()
    assert not list(outdir.rglob("*.png"))


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*--ckpt.*--demo"):
        read_checkpoint(tmp_path / "nope.ckpt")


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_truncated_file(tmp_path, golden_sd, suffix):
    path = tmp_path / f"model{suffix}"
    write(golden_sd, path, nested=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated|corrupt"):
        read_checkpoint(path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_text("this is a text file, not weights\n")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        read_checkpoint(path)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_checkpoint(empty)


def test_vae_only_file_is_refused(tmp_path, golden_sd):
    path = tmp_path / "vae.safetensors"
    save_file({k: v for k, v in golden_sd.items() if k.startswith("first_stage_model.")}, str(path))
    with pytest.raises(CheckpointError, match="not a CompVis/Stability latent-diffusion checkpoint"):
        load_model_from_config(OmegaConf.load(str(GOLDEN_CONFIG)), str(path))
