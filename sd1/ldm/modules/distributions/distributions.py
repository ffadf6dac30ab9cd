"""The KL autoencoder's diagonal Gaussian posterior (CompVis ``ldm/modules/distributions/distributions.py``)."""
import math

import torch


class AbstractDistribution:
    def sample(self):
        raise NotImplementedError()

    def mode(self):
        raise NotImplementedError()


class DiracDistribution(AbstractDistribution):
    """A point mass at ``value``: sample() and mode() both return it."""

    def __init__(self, value):
        self.value = value

    def sample(self):
        return self.value

    def mode(self):
        return self.value


class DiagonalGaussianDistribution:
    """N(mean, diag(var)) built from encoder moments.

    parameters: (B, 2*C, H, W), split along dim 1 into mean (B, C, H, W) and logvar (B, C, H, W); logvar is
    clamped to [-30, 20]. With ``deterministic=True`` std and var are zero, so sample() returns the mean.
    """

    def __init__(self, parameters, deterministic=False):
        self.parameters = parameters
        self.mean, self.logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(self.logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if self.deterministic:
            self.var = self.std = torch.zeros_like(self.mean)

    def sample(self, generator=None):
        """mean + std * eps with eps ~ N(0, I): (B, C, H, W), same device and dtype as the parameters.

        generator: optional ``torch.Generator``; if it lives on another device than the parameters, the noise is
        drawn there and moved.
        """
        noise_device = self.mean.device if generator is None else generator.device
        eps = torch.randn(self.mean.shape, generator=generator, device=noise_device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def kl(self, other=None):
        """KL(self || other) summed over (C, H, W) -> (B,); ``other=None`` means N(0, I)."""
        if self.deterministic:
            return torch.zeros(1, device=self.mean.device, dtype=self.mean.dtype)
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=[1, 2, 3],
        )

    def nll(self, sample, dims=(1, 2, 3)):
        """Negative log-likelihood of ``sample`` (B, C, H, W), summed over ``dims`` -> (B,)."""
        if self.deterministic:
            return torch.zeros(1, device=self.mean.device, dtype=self.mean.dtype)
        logtwopi = math.log(2.0 * math.pi)
        return 0.5 * torch.sum(logtwopi + self.logvar + (sample - self.mean).pow(2) / self.var, dim=list(dims))

    def mode(self):
        """The mean, (B, C, H, W)."""
        return self.mean


def normal_kl(mean1, logvar1, mean2, logvar2):
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))); arguments broadcast, at least one a tensor.

    Same formula as ``normal_kl`` in CompVis (from openai/guided-diffusion ``losses.py``).
    """
    tensor = None
    for obj in (mean1, logvar1, mean2, logvar2):
        if isinstance(obj, torch.Tensor):
            tensor = obj
            break
    if tensor is None:
        raise TypeError("normal_kl: at least one argument must be a torch.Tensor.")
    logvar1, logvar2 = [x if isinstance(x, torch.Tensor) else torch.tensor(x).to(tensor) for x in (logvar1, logvar2)]
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + ((mean1 - mean2) ** 2) * torch.exp(-logvar2))
