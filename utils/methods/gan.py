"""The confident-classifier GAN baseline (Lee, Lee, Lee, Shin, "Training confidence-calibrated classifiers for
detecting out-of-distribution samples", ICLR 2018, arXiv 1711.09325), as CCU's Table 2 compares against it.

A generator G learns samples near the boundary of the data on which the classifier f is pushed to the uniform
distribution U over the K classes. Each step, on a clean batch (x, y) and codes z, z' ~ N(0, I):

    D:  BCE(D(x), 1) + BCE(D(G(z)), 0)
    G:  BCE(D(G(z)), 1) + beta * KL(U || softmax(f(G(z))))
    f:  CE(f(x), y)     + beta * KL(U || softmax(f(G(z'))))      on fresh codes z'

with KL(U || p) = -log K - (1/K) sum_k log p_k per sample, averaged over the batch (the original writes
`K * kl_div(log_softmax(f(G(z))), U)`, a mean over all N*K elements times K: the same per-sample KL). beta is
`--gan-beta` (1; 0.1 on CIFAR). G and D: DCGAN (`models.gan`), Adam `--gan-lr` 2e-4 with betas (0.5, 0.999), the
classifier's lr schedule (x0.1 at 60% of the epochs). The classifier's settings (LeNet on MNIST, VGG-13 on the
other datasets, Adam 2e-4, 100 epochs, no weight decay) and G/D's are `GAN_PARAMS` below (`--gan-*`).

G and D are the method's auxiliary networks (`utils.methods.base.Auxiliary`): `gan_step` runs the D and G updates
and hands f's loss the fresh samples G(z') as its out batch. As in the original, f sees the clean and the
generated batch in two separate forward passes (batch norm statistics are never mixed), and G's update runs f in
training mode. Differences from the original code: G's and f's updates back-propagate only into the network being
updated (the original's extra gradients are zeroed before use, so the result is the same); D outputs a logit and
the loss is BCE-with-logits; the 28x28 and 8x8 G/D are ours.
"""
from __future__ import annotations

import argparse
import math
from argparse import Namespace
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from utils.cli import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, UNIT_OPEN_HIGH
from utils.methods.base import Auxiliary, FlagGroup, Method
from utils.distributed import unwrap


@dataclass(frozen=True)
class GANParams:
    """The confident-classifier GAN (Lee, Lee, Lee, Shin, ICLR 2018, arXiv 1711.09325): its generator and
    discriminator (`train.py --gan-*`), and `classifier`, the PARAMS fields it replaces under `--method gan`."""
    gan_arch: str                                 # models.gan.GAN_ARCHS: "dcgan32", "dcgan28", "dcgan8"
    gan_beta: float = 1.0                         # weight of KL(U || softmax(f(G(z)))) for G and the classifier
    gan_latent_dim: int = 100                     # z ~ N(0, I_100)
    gan_width: int = 64                           # DCGAN ngf = ndf
    gan_lr: float = 2e-4                          # Adam, G and D
    gan_betas: tuple[float, float] = (0.5, 0.999)
    classifier: dict = field(default_factory=dict)


# The original's classifier: Adam 2e-4 (default betas), no weight decay, lr x0.1 at epoch 60 of 100, batch 128,
# no augmentation. CCU's GAN baseline: LeNet on MNIST, VGG-13 on its other datasets (a ResNet did not converge):
# the original's VGG-13, without batch norm and with a 512-512-K head, dropout 0.5 (models.vgg.vgg13_nobn).
_GAN_CLASSIFIER = dict(optimizer="adam", lr=2e-4, epochs=100, milestones=(0.6,), gamma=0.1, weight_decay=0.0,
                       batch_size=128, augment="none")
_GAN_VGG = dict(_GAN_CLASSIFIER, arch="vgg13_nobn", dropout=0.5, arch_kwargs={})

GAN_PARAMS: dict[str, GANParams] = {
    "MNIST": GANParams("dcgan28", classifier=_GAN_CLASSIFIER),
    "FMNIST": GANParams("dcgan28", classifier=_GAN_VGG),
    "SVHN": GANParams("dcgan32", classifier=_GAN_VGG),
    "CIFAR10": GANParams("dcgan32", gan_beta=0.1, classifier=dict(_GAN_VGG, batch_size=64)),
    "CIFAR100": GANParams("dcgan32", gan_beta=0.1, classifier=_GAN_VGG),  # not in the original: as CIFAR-10
    # built-in 8x8 digits: a narrow G/D, the dataset's own classifier defaults (the demo's budget)
    "digits": GANParams("dcgan8", gan_width=32),
}


def gan_defaults(dataset: str) -> dict:
    """The flags `--method gan` sets by default on `dataset`: G/D's and the classifier's (`GAN_PARAMS`)."""
    if dataset not in GAN_PARAMS:
        raise ValueError(f"no gan defaults for dataset {dataset!r}; utils.methods.gan.GAN_PARAMS has: "
                         f"{', '.join(GAN_PARAMS)}")
    params = asdict(GAN_PARAMS[dataset])
    classifier = params.pop("classifier")
    return {**params, **classifier}


def _add_gan(group: argparse._ArgumentGroup) -> None:
    """Flags of `--method gan`; None takes GAN_PARAMS[dataset]."""
    group.add_argument("--gan-arch", default=None, help="generator/discriminator: a key of models.gan.GAN_ARCHS")
    group.add_argument("--gan-beta", type=float, default=None, help="weight of KL(U || softmax(f(G(z))))")
    group.add_argument("--gan-latent-dim", type=int, default=None)
    group.add_argument("--gan-width", type=int, default=None, help="DCGAN base width (ngf = ndf)")
    group.add_argument("--gan-lr", type=float, default=None, help="Adam lr of G and D")
    group.add_argument("--gan-betas", type=float, nargs=2, default=None, help="Adam betas of G and D")


GAN_FLAGS = FlagGroup("confident-classifier GAN", _add_gan,
                      ranges={"gan_beta": NON_NEGATIVE, "gan_latent_dim": AT_LEAST_ONE, "gan_width": AT_LEAST_ONE,
                              "gan_lr": POSITIVE, "gan_betas": UNIT_OPEN_HIGH})


def kl_uniform_to_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(U || softmax(logits)) = -log K - mean_k log_softmax_k(logits), shape (N,)."""
    return -math.log(logits.shape[1]) - F.log_softmax(logits, dim=1).mean(dim=1)


@contextmanager
def real_data_statistics(model: nn.Module) -> Iterator[None]:
    """Inside: batch-norm layers in training mode still normalise with the batch's own statistics, but their
    running statistics (and batch counters) stay as they were, so the statistics used at test time come from real
    images only. (Each step runs the classifier on G(z) twice and on real data once; otherwise the test-time
    statistics would be two thirds generated.) Done by momentum 0 for the duration, counters restored after."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(layer.momentum, layer.num_batches_tracked.clone()) for layer in layers]
    for layer in layers:
        layer.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
    try:
        yield
    finally:
        for layer, (momentum, count) in zip(layers, saved):
            layer.momentum = momentum
            layer.num_batches_tracked.copy_(count)


def gan_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_out: Optional[torch.Tensor],
             opts: Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier's loss: mean CE(f(x), y) + beta * mean KL(U || softmax(f(x_out))), x_out = G(z')."""
    if x_out is None:
        raise ValueError("gan's classifier loss needs generated samples x_out from gan_step")
    logits = model(x)
    # Separate passes keep the batch statistics of real and generated batches apart, as the original does, and the
    # generated pass leaves the running statistics alone (`real_data_statistics`). The second runs on the
    # unwrapped module so that DistributedDataParallel sees one forward per step; both passes share the
    # parameters, so one backward sums their gradients before DDP's all-reduce hooks fire.
    with real_data_statistics(model):
        logits_out = unwrap(model)(x_out)
    loss = F.cross_entropy(logits, y) + opts.gan_beta * kl_uniform_to_softmax(logits_out).mean()
    return loss, logits


def build_gan(model: nn.Module, opts: Namespace) -> Auxiliary:
    """G and D for the classifier's data shape, on its device, with Adam and the classifier's lr milestones."""
    from models.gan import Discriminator, Generator

    if len(opts.data_shape) != 3:
        raise ValueError(f"gan generates images but {opts.dataset} has vectors of shape {tuple(opts.data_shape)}")
    device = next(model.parameters()).device
    generator = Generator(opts.gan_arch, opts.in_channels, opts.input_size, opts.gan_latent_dim,
                          opts.gan_width).to(device)
    discriminator = Discriminator(opts.gan_arch, opts.in_channels, opts.input_size, opts.gan_width).to(device)
    nets = {"generator": generator, "discriminator": discriminator}
    optimizers = {name: torch.optim.Adam(net.parameters(), lr=opts.gan_lr, betas=tuple(opts.gan_betas))
                  for name, net in nets.items()}
    from utils.training import multistep_scheduler

    schedulers = {name: multistep_scheduler(opt, opts) for name, opt in optimizers.items()}
    return Auxiliary(nets, optimizers, schedulers)


def gan_step(model: nn.Module, aux: Auxiliary, x: torch.Tensor, y: torch.Tensor, x_out: Optional[torch.Tensor],
             opts: Namespace) -> torch.Tensor:
    """One D update, one G update; returns fresh detached samples G(z') for the classifier's loss."""
    generator, discriminator = aux.nets["generator"], aux.nets["discriminator"]
    fake = generator(generator.sample_latent(len(x), x.device))
    d_real, d_fake = discriminator(x), discriminator(fake.detach())
    loss_d = (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
              + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
    aux.update("discriminator", loss_d)
    d_fooled = discriminator(fake)
    loss_g_gan = F.binary_cross_entropy_with_logits(d_fooled, torch.ones_like(d_fooled))
    with real_data_statistics(model):
        kl_fake = kl_uniform_to_softmax(model(fake)).mean()
    aux.update("generator", loss_g_gan + opts.gan_beta * kl_fake)
    aux.log(gan_d_loss=loss_d, gan_g_loss=loss_g_gan, gan_kl_fake=kl_fake)
    with torch.no_grad():
        return generator(generator.sample_latent(len(x), x.device))


GAN_METHODS: dict[str, Method] = {"gan": Method(loss=gan_loss, flags=(GAN_FLAGS,), dataset_defaults=gan_defaults,
                                                auxiliary=build_gan, aux_step=gan_step)}
