"""Noise families used as out-distribution data, as batched torch code that runs on the input's device.

* ``uniform``: U[0,1] per pixel (CCU "UniformNoise", ODIN "Uniform").
* ``gaussian``: ODIN's N(0.5, 1) clipped to [0, 1] (Liang et al., arXiv:1706.02690).
* ``ccu_noise``: CCU's "Noise" (Meinke & Hein, arXiv:1909.12180, docs/methods.md#noise-families): from in-distribution
  images, x <- sigmoid(gamma * (G_sigma * P(x) - 0.5)) with P one permutation of the HxW positions shared by the
  channels, G_sigma scipy's ``gaussian_filter`` over the whole CxHxW tensor (mode "reflect", truncate 4),
  sigma ~ U[1, 2.5] and gamma ~ U[5, 30], all drawn per image.
* ``acet_noise``: ACET/CEDA's ``gen_adv`` (Hein et al., arXiv:1812.05720, docs/methods.md#noise-families): the first
  half of a batch are pixel permutations of clean images, the rest U[0,1]; all are low-passed per channel by a 15x15
  Gaussian with one sigma ~ U[1, 2.5] per batch and symmetric padding, then min-max rescaled per image.

Every function takes an optional ``torch.Generator``; it must live on the same device as the input.
"""
from __future__ import annotations

from typing import Optional

import torch

TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default kernel radius, in sigmas
SIGMA_RANGE = (1.0, 2.5)  # both CCU and ACET draw sigma ~ U[1, 2.5]
GAMMA_RANGE = (5.0, 30.0)  # CCU contrast gamma ~ U[5, 30]
ACET_KERNEL_SIZE = 15  # ACET: offsets -7..7
ACET_PERM_FRACTION = 0.5  # ACET frac_perm


def _rand(shape: tuple[int, ...], like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=like.device, dtype=like.dtype)


def reflect_indices(length: int, pad: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Indices that pad an axis of ``length`` by ``pad`` on both sides, "d c b a | a b c d | d c b a".

    This is scipy.ndimage's "reflect" mode (TensorFlow's "SYMMETRIC"), repeated as often as needed, so it
    also works when ``pad`` exceeds ``length`` (scipy blurs across a 3-channel axis with radius up to 10).
    """
    index = torch.arange(-pad, length + pad, device=device) % (2 * length)
    return torch.where(index < length, index, 2 * length - 1 - index)


def gaussian_kernels(sigma: torch.Tensor, radius: int, truncate: Optional[float] = TRUNCATE) -> torch.Tensor:
    """(N, 2*radius+1) normalised 1-D Gaussian kernels, one per sigma.

    With ``truncate``, weights beyond scipy's own radius int(truncate*sigma + 0.5) are zero, so a kernel padded
    to a common ``radius`` equals scipy's kernel exactly.
    """
    offsets = torch.arange(-radius, radius + 1, device=sigma.device, dtype=sigma.dtype)
    sigma = sigma.reshape(-1, 1)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    if truncate is not None:
        own_radius = torch.floor(truncate * sigma + 0.5)
        weights = weights * (offsets.abs() <= own_radius)
    return weights / weights.sum(dim=1, keepdim=True)


def blur_matrices(kernels: torch.Tensor, length: int) -> torch.Tensor:
    """(N, L, L) matrices A with (A @ v) = v correlated with kernel n under reflect padding (see above).

    Writing a 1-D filter on a short axis (L <= 32 here) as a banded matrix turns per-sample kernels into one
    batched matmul, far faster than a grouped convolution with one group per image.
    """
    n, size = kernels.shape
    radius = (size - 1) // 2
    source = reflect_indices(length, radius, kernels.device)
    window = torch.arange(length, device=kernels.device).unsqueeze(1) + torch.arange(size, device=kernels.device)
    columns = source[window]  # (L, K): input position read by output l at kernel offset k
    matrices = torch.zeros(n, length, length, device=kernels.device, dtype=kernels.dtype)
    return matrices.scatter_add_(2, columns.expand(n, -1, -1), kernels.unsqueeze(1).expand(-1, length, -1))


def blur_axis(x: torch.Tensor, dim: int, kernels: torch.Tensor) -> torch.Tensor:
    """Correlate ``x`` (N, ...) along ``dim`` with per-sample kernels (N, K), or one shared kernel (1, K).

    Reflect padding (see ``reflect_indices``); the kernels are symmetric, so correlation = convolution.
    """
    moved = x.movedim(dim, -1)
    matrices = blur_matrices(kernels, moved.shape[-1])
    rows = moved.reshape(moved.shape[0], -1, moved.shape[-1])  # (N, M, L)
    out = torch.matmul(rows, matrices.transpose(1, 2))  # (1, L, L) broadcasts over N
    return out.reshape(moved.shape).movedim(-1, dim)


def gaussian_filter_batch(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``scipy.ndimage.gaussian_filter(x[i], sigma[i])`` over all non-batch axes, for every i at once."""
    largest = max(SIGMA_RANGE[1], float(sigma.max())) if sigma.numel() else SIGMA_RANGE[1]
    radius = int(TRUNCATE * largest + 0.5)
    kernels = gaussian_kernels(sigma.to(x.dtype), radius)
    for dim in range(1, x.dim()):
        x = blur_axis(x, dim, kernels)
    return x


def permute_pixels(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Shuffle the HxW positions of every image (its own permutation), keeping each pixel's channels together."""
    n, channels = x.shape[:2]
    flat = x.reshape(n, channels, -1)
    perm = torch.argsort(_rand((n, flat.shape[2]), x, generator), dim=1)
    return flat.gather(2, perm.unsqueeze(1).expand(-1, channels, -1)).reshape(x.shape)


def uniform_batch(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """U[0,1] noise with the shape, dtype and device of ``x``."""
    return _rand(tuple(x.shape), x, generator)


def gaussian_batch(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """ODIN's Gaussian noise: clip(N(0.5, 1), 0, 1), shaped like ``x``."""
    noise = torch.randn(tuple(x.shape), generator=generator, device=x.device, dtype=x.dtype)
    return (noise + 0.5).clamp_(0.0, 1.0)


def ccu_noise_batch(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """CCU noise from clean images x (N, C, H, W): permute, blur over C,H,W, contrast; per-image draws."""
    if x.dim() != 4:
        raise ValueError(f"ccu noise needs images (N, C, H, W), got shape {tuple(x.shape)}")
    n = x.shape[0]
    permuted = permute_pixels(x, generator)
    low, high = SIGMA_RANGE
    sigma = low + (high - low) * _rand((n,), x, generator)
    blurred = gaussian_filter_batch(permuted, sigma)
    low, high = GAMMA_RANGE
    gamma = (low + (high - low) * _rand((n,), x, generator)).view(n, 1, 1, 1)
    return torch.sigmoid(gamma * (blurred - 0.5))


def acet_noise_batch(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """ACET/CEDA noise from a clean batch x (N, C, H, W), on x's device (docs/methods.md#noise-families).

    z = [P(x_1..x_{N/2}); U[0,1]^(N - N/2)], z <- G_sigma * z per channel (15x15, one sigma per batch,
    symmetric padding), then z_i <- (z_i - min z_i) / (max z_i - min z_i).
    """
    if x.dim() != 4:
        raise ValueError(f"acet noise needs images (N, C, H, W), got shape {tuple(x.shape)}")
    n = x.shape[0]
    n_perm = int(ACET_PERM_FRACTION * n)
    permuted = permute_pixels(x[:n_perm], generator)
    uniform = _rand((n - n_perm, *x.shape[1:]), x, generator)
    z = torch.cat([permuted, uniform.to(x.dtype)], dim=0)
    low, high = SIGMA_RANGE
    sigma = low + (high - low) * _rand((1,), x, generator)  # a tensor, so no host sync on GPU
    kernel = gaussian_kernels(sigma, ACET_KERNEL_SIZE // 2, truncate=None)
    z = blur_axis(blur_axis(z, 2, kernel), 3, kernel)  # separable 2-D Gaussian, per channel
    flat = z.reshape(n, -1)
    z_min = flat.min(dim=1, keepdim=True).values
    z_max = flat.max(dim=1, keepdim=True).values
    # a constant image maps to 0, rather than NaN or its float rounding noise blown up to [0, 1]
    spread = z_max - z_min
    flat = (flat - z_min) * torch.where(spread > 1e-6, 1.0 / spread.clamp_min(1e-6), torch.zeros_like(spread))
    return flat.clamp_(0.0, 1.0).reshape(x.shape)


NOISE_BATCH = {
    "uniform": uniform_batch,
    "gaussian": gaussian_batch,
    "ccu_noise": ccu_noise_batch,
    "acet_noise": acet_noise_batch,
}
NEEDS_SOURCE = ("ccu_noise", "acet_noise")  # built from in-distribution images
CHUNK = {"ccu_noise": 1000, "acet_noise": 128}  # acet: one sigma per 128-image batch, as in training


def make_noise(kind: str, shape: tuple[int, ...], n: int, generator: torch.Generator,
               source: Optional[torch.Tensor] = None) -> torch.Tensor:
    """n noise samples of ``shape`` from the ``kind`` family, as a float32 (n, *shape) tensor.

    ``source`` (M, *shape) are the clean images that ccu/acet noise start from; drawn without
    replacement when n <= M. Without a source they start from U[0,1] images instead.
    """
    if kind not in NOISE_BATCH:
        raise ValueError(f"unknown noise {kind!r}; valid: {', '.join(NOISE_BATCH)}")
    template = torch.empty((n, *shape), dtype=torch.float32)
    if kind not in NEEDS_SOURCE:
        return NOISE_BATCH[kind](template, generator)
    if source is None:
        seeds = uniform_batch(template, generator)
    else:
        m = len(source)
        index = (torch.randperm(m, generator=generator)[:n] if n <= m
                 else torch.randint(m, (n,), generator=generator))
        seeds = source[index].to(torch.float32)
    step = CHUNK[kind]
    chunks = [NOISE_BATCH[kind](seeds[i:i + step], generator) for i in range(0, n, step)]
    return torch.cat(chunks, dim=0) if chunks else template
