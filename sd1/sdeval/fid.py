"""FID: Inception pool3 statistics and the Frechet distance between two Gaussians.

FID = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2})   (Heusel et al. 2017, Eq. 6)

Features come from `sdeval.inception` (pytorch-fid's FID Inception, pool3, 2048-d);
statistics are `mu = mean`, `sigma = np.cov(rowvar=False)` (unbiased), as pytorch-fid, and
the .npz files hold the same keys (`mu`, `sigma`), so they interchange with pytorch-fid's.
"""
import zipfile
from pathlib import Path

import numpy as np
import torch

from .inception import POOL_DIM


def feature_statistics(features: np.ndarray):
    """features: (N, D) -> (mu: (D,), sigma: (D, D)), float64. Needs N >= 2 finite rows."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need at least 2 feature rows (N, D) for a covariance, got shape {features.shape}")
    bad = int((~np.isfinite(features)).any(axis=1).sum())
    if bad:
        raise ValueError(f"{bad} of {features.shape[0]} Inception feature rows hold NaN or inf: the network's "
                         "weights are broken")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def save_statistics(path, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Write `mu`, `sigma` to an .npz (the format of pytorch-fid's `--save-stats`); `path`: a path or a
    binary file object."""
    np.savez(path, mu=mu, sigma=sigma)


def load_statistics(path, dim: int = POOL_DIM):
    """Read `mu`, `sigma` from an .npz written by `save_statistics` or by pytorch-fid.

    Raises:
        FileNotFoundError / ValueError: missing file, missing keys, shapes other than (dim,), (dim, dim), or
            NaN / inf values.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"statistics file not found: {path}")
    not_stats = (f"{path} is not an .npz file of Inception statistics (arrays 'mu' and 'sigma'); make one with "
                 "eval_fid.py --save-stats")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        raise ValueError(not_stats) from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(not_stats)
    with data:
        if "mu" not in data.files or "sigma" not in data.files:
            raise ValueError(f"{path}: expected arrays 'mu' and 'sigma' (pytorch-fid stats), found {data.files}")
        try:
            mu, sigma = (np.asarray(data[key]).astype(np.float64) for key in ("mu", "sigma"))
        except (OSError, ValueError, TypeError, EOFError, zipfile.BadZipFile):
            raise ValueError(not_stats) from None
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise ValueError(f"{path}: expected mu {(dim,)} and sigma {(dim, dim)} (Inception pool3), "
                         f"got {mu.shape} and {sigma.shape}")
    for name, array in (("mu", mu), ("sigma", sigma)):
        if not np.isfinite(array).all():
            raise ValueError(f"{path}: {name} holds {int((~np.isfinite(array)).sum())} NaN or inf values; "
                             "make the statistics again with eval_fid.py --save-stats")
    return mu, sigma


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((S1 S2)^{1/2}) for symmetric PSD S1, S2 of shape (D, D).

    S1 S2 is similar to the symmetric PSD M = S1^{1/2} S2 S1^{1/2}, so the trace is the sum of
    sqrt(eig(M)). Two symmetric eigendecompositions (float64, torch/LAPACK) replace
    pytorch-fid's `scipy.linalg.sqrtm(S1 @ S2)`: same quantity, stays real, and is far faster.
    Eigenvalues of M below `max_eig * D * eps` are rounding noise and count as 0; without that,
    a rank-deficient S (N < D samples) adds about sqrt(1e-16 * max) per null direction.
    """
    s1 = torch.from_numpy(np.asarray(sigma1, dtype=np.float64))
    s2 = torch.from_numpy(np.asarray(sigma2, dtype=np.float64))
    w, v = torch.linalg.eigh(s1)
    root1 = (v * w.clamp(min=0).sqrt()) @ v.T
    m = root1 @ s2 @ root1
    eig = torch.linalg.eigvalsh((m + m.T) / 2)
    tol = eig.max().clamp(min=0) * eig.numel() * torch.finfo(eig.dtype).eps
    eig = torch.where(eig > tol, eig, torch.zeros_like(eig))
    return float(eig.sqrt().sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2); mu: (D,), sigma: (D, D)."""
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2))
