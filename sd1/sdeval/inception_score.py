"""Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), mean and std over splits.

The logits are the FID Inception network's 1008-way logits without the fc bias
(`FIDInceptionV3.class_logits`), as in the original TF code and torch-fidelity; numbers from
torchvision's 1000-class Inception (e.g. pytorch-gan-metrics) are not comparable.
"""
import numpy as np
from scipy.special import log_softmax


def inception_score(logits: np.ndarray, splits: int = 10):
    """logits: (N, C) -> (mean, std) of the per-split scores.

    Split i holds rows [i*N//splits, (i+1)*N//splits), in the given order (the original code's
    rule). In each split, p(y) is the mean of p(y|x) over its rows and the score is
    exp(mean_x sum_y p(y|x) (log p(y|x) - log p(y))).
    """
    logits = np.asarray(logits, dtype=np.float64)
    n = logits.shape[0]
    if splits < 1 or n < splits:
        raise ValueError(f"need at least one image per split: {n} images, {splits} splits")
    log_p = log_softmax(logits, axis=1)
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits:(i + 1) * n // splits]
        log_py = np.log(np.exp(part).mean(axis=0))
        kl = (np.exp(part) * (part - log_py)).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))
