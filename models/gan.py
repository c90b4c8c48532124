"""DCGAN-style generator and discriminator (Radford, Metz, Chintala, arXiv 1511.06434) for the confident-classifier
GAN (Lee et al., ICLR 2018, arXiv 1711.09325), in three image sizes.

Generator: z (N, latent_dim, 1, 1) -> transposed conv (kernel = base side, stride 1) to width * 2^n channels at
base x base, then n transposed convs (kernel 4, stride 2, pad 1) each doubling the side and halving the channels,
batch norm + ReLU after every layer but the last, sigmoid output in [0, 1] (the project's pixel space).
Discriminator: n stride-2 convs from 2 * width channels, doubling (LeakyReLU 0.2, batch norm after all but the
first), then a conv with kernel = base side to one LOGIT per image (the original ends in a sigmoid and uses BCE; we use
BCE-with-logits, the same loss computed stably).

    dcgan32: base 4, n = 3   (ngf = ndf = 64: G 512@4 -> 256@8 -> 128@16 -> C@32, D C@32 -> 128@16 -> 256@8 ->
                              512@4 -> 1, the original's _netG / _netD, whose D starts at ndf * 2)
    dcgan28: base 7, n = 2   (MNIST-sized; the original's 28x28 variant is unpublished)
    dcgan8:  base 2, n = 2   (scikit-learn's 8x8 digits)

Weights start as in DCGAN: convs N(0, 0.02), batch-norm scales N(1, 0.02), shifts 0.
"""
from __future__ import annotations

import torch
from torch import nn

# name -> (image side, base side, number of stride-2 layers); side = base * 2^n
GAN_ARCHS: dict[str, tuple[int, int, int]] = {
    "dcgan32": (32, 4, 3),
    "dcgan28": (28, 7, 2),
    "dcgan8": (8, 2, 2),
}


def _dcgan_init(module: nn.Module) -> None:
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(layer.weight, 0.0, 0.02)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.normal_(layer.weight, 1.0, 0.02)
            nn.init.zeros_(layer.bias)


def _arch(name: str, input_size: int) -> tuple[int, int]:
    if name not in GAN_ARCHS:
        raise ValueError(f"unknown GAN arch {name!r}; valid: {', '.join(GAN_ARCHS)}")
    side, base, n_up = GAN_ARCHS[name]
    if side != input_size:
        fits = [key for key, (s, _, _) in GAN_ARCHS.items() if s == input_size]
        raise ValueError(f"GAN arch {name} makes {side}x{side} images but the data are {input_size}x{input_size}; "
                         f"use --gan-arch {' or '.join(fits) if fits else '(none fits this size)'}")
    return base, n_up


class Generator(nn.Module):
    """G(z): (N, latent_dim, 1, 1) standard normal codes -> (N, C, H, W) images in [0, 1]."""

    def __init__(self, arch: str, in_channels: int, input_size: int, latent_dim: int = 100, width: int = 64) -> None:
        super().__init__()
        base, n_up = _arch(arch, input_size)
        self.latent_dim = latent_dim
        channels = width * 2 ** n_up
        layers: list[nn.Module] = [nn.ConvTranspose2d(latent_dim, channels, base, 1, 0, bias=False),
                                   nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        for step in range(n_up):
            last = step == n_up - 1
            out = in_channels if last else channels // 2
            layers.append(nn.ConvTranspose2d(channels, out, 4, 2, 1, bias=False))
            layers += [nn.Sigmoid()] if last else [nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            channels = out
        self.net = nn.Sequential(*layers)
        _dcgan_init(self)

    def sample_latent(self, n: int, device: torch.device | str,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """n latent codes z ~ N(0, I) on `device`; drawn from `generator` (a seeded CPU one) when given."""
        if generator is None:
            return torch.randn(n, self.latent_dim, 1, 1, device=device)
        return torch.randn(n, self.latent_dim, 1, 1, generator=generator).to(device)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Discriminator(nn.Module):
    """D(x): (N, C, H, W) images -> (N,) logits of "x is a real training image"."""

    def __init__(self, arch: str, in_channels: int, input_size: int, width: int = 64) -> None:
        super().__init__()
        base, n_down = _arch(arch, input_size)
        layers: list[nn.Module] = []
        channels = in_channels
        for step in range(n_down):
            out = width * 2 ** (step + 1)  # the original's _netD: ndf*2, ndf*4, ndf*8 channels
            layers.append(nn.Conv2d(channels, out, 4, 2, 1, bias=False))
            if step > 0:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            channels = out
        layers.append(nn.Conv2d(channels, 1, base, 1, 0, bias=False))
        self.net = nn.Sequential(*layers)
        _dcgan_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten()
