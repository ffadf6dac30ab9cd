"""Prompt sets: build a COCO caption set, write prompt files, pair prompts with images (reading a prompt file is
`sdgen.prompts.read_prompts`).

The shipped sets live in `data/` (see `data/README.md`): `imagenet-class-prompts.txt`
(1000 ImageNet classes) and `coco30k-prompts.txt` (the DaTo authors' COCO-30k captions).
"""
import json
from pathlib import Path
from typing import Union

import numpy as np

PathLike = Union[str, Path]


def normalize_caption(caption: str) -> str:
    """Collapse every run of whitespace (spaces, tabs, newlines) to one space and strip the ends."""
    return " ".join(caption.split())


def build_coco_prompts(captions_json: PathLike, n: int, seed: int) -> list:
    """Choose `n` distinct COCO images and one caption of each, reproducibly.

    `captions_json` is a COCO captions annotation file (e.g. `captions_val2014.json`:
    a dict whose "annotations" list holds {"id", "image_id", "caption"} records).

    The rule, exactly:
      1. Captions are whitespace-normalised (`normalize_caption`); captions that are
         empty after that are dropped.
      2. The candidate images are the distinct `image_id`s that still have a caption,
         sorted ascending; each image's captions are sorted by annotation `id`.
      3. `rng = numpy.random.default_rng(seed)`; `order = rng.permutation(len(images))`;
         the chosen images are `images[order[:n]]`, in that order (= prompt order).
      4. Then, with the same `rng`, image by image in prompt order, the caption index is
         `rng.integers(len(captions_of_image))`.
    So the output depends only on the annotation file's content, `n`, `seed` and the NumPy
    version (NumPy may change `Generator` streams between releases; it rarely does).

    Returns: `n` captions, one per chosen image.

    Raises:
        ValueError: `n` < 1, `n` exceeds the number of captioned images, or the file is
            not a COCO captions file (a caption that is not a string included).
    """
    captions_json = Path(captions_json)
    with open(captions_json, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(
            f"{captions_json}: not a COCO captions file (expected a JSON object with an "
            "'annotations' list, as in captions_val2014.json)"
        )
    by_image = {}
    for ann in data["annotations"]:
        try:
            image_id, ann_id, caption = ann["image_id"], ann["id"], ann["caption"]
        except (KeyError, TypeError):
            raise ValueError(
                f"{captions_json}: annotation without 'image_id', 'id' and 'caption': {ann!r}"
            ) from None
        if not isinstance(caption, str):
            raise ValueError(f"{captions_json}: annotation {ann_id!r} has caption {caption!r}, expected a string")
        caption = normalize_caption(caption)
        if caption:
            by_image.setdefault(image_id, []).append((ann_id, caption))

    image_ids = sorted(by_image)
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if n > len(image_ids):
        raise ValueError(
            f"n={n} exceeds the {len(image_ids)} distinct captioned images in {captions_json}; "
            "ask for at most that many (one caption per image)"
        )

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(image_ids))[:n]
    prompts = []
    for k in order:
        captions = [c for _, c in sorted(by_image[image_ids[k]])]
        prompts.append(captions[int(rng.integers(len(captions)))])
    return prompts


def write_prompts(path: PathLike, prompts: list, force: bool = False) -> None:
    """Write one prompt per line (UTF-8, final newline). Refuses to overwrite unless `force`."""
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists; pass force=True (--force) to overwrite it")
    for i, p in enumerate(prompts):
        if "\n" in p or "\r" in p or not p.strip():
            raise ValueError(f"prompt {i} is blank or contains a newline: {p!r}")
    path.write_text("".join(p + "\n" for p in prompts), encoding="utf-8")


def prompts_for_images(image_paths, prompts: list, cycle: bool = False) -> list:
    """The prompt of each image: image file `<...>K.png` (K = the integer ending its name,
    e.g. `00042.png`) gets `prompts[K]`, or `prompts[K % len(prompts)]` with `cycle=True`
    (images made in several passes over one prompt file, e.g. ImageNet "2 per class":
    images 0-999 and 1000-1999 both use lines 1-1000).

    Raises:
        ValueError: a name without a trailing integer, two images with the same index,
            or an index past the prompt file without `cycle`.
    """
    from .images import image_index

    out, seen = [], {}
    for path in image_paths:
        k = image_index(path)
        if k is None:
            raise ValueError(f"cannot pair {path} with a prompt: its file name does not end in an "
                             "integer index (expected names like 00042.png = prompt line 43)")
        if k in seen:
            raise ValueError(f"{seen[k]} and {path} both have index {k}")
        seen[k] = path
        if k >= len(prompts) and not cycle:
            raise ValueError(f"{path} has index {k} but the prompt file has only {len(prompts)} lines; "
                             "if the images were made in several passes over the file "
                             "(ImageNet '2 per class'), use cycle=True (--prompts-cycle)")
        out.append(prompts[k % len(prompts)])
    return out
