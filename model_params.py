"""Per-dataset training defaults (docs/methods.md#ccu-training, #acet-schedules, #ddu-training). Numbers and names only;
nothing runs at import.

`train.py` flags that default to None take their value from `PARAMS[dataset]` (or from `RECIPES[name]`
when `--recipe` names one), so one table lists every default of the paper reproductions.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace


@dataclass(frozen=True)
class Params:
    arch: str
    optimizer: str                      # "adam" or "sgd"
    lr: float
    epochs: int
    batch_size: int = 128
    test_batch_size: int = 100          # CCU's test batch
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple[float, ...] = (0.5, 0.75, 0.9)   # fractions of the epochs where the lr is multiplied by gamma
    gamma: float = 0.1
    augment: str = "ccu"                # a key of data.AUGMENTATIONS, or "none"
    out_data: str = "acet_noise"        # training out-distribution for ceda/acet/oe/ccu
    val_fraction: float = 0.0
    spectral_norm_coeff: float | None = None
    mod: bool = False
    dropout: float = 0.0
    arch_kwargs: dict = field(default_factory=dict)


_MNIST = Params(arch="lenet", optimizer="adam", lr=1e-3, epochs=100)
_SGD = dict(optimizer="sgd", lr=0.1, epochs=100)

PARAMS: dict[str, Params] = {
    "MNIST": _MNIST,
    "FMNIST": Params(arch="resnet18", **_SGD),
    "SVHN": Params(arch="resnet18", **_SGD),
    "CIFAR10": Params(arch="resnet18", **_SGD),
    "CIFAR100": Params(arch="resnet18", **_SGD),
    # DDU's Dirty-MNIST (docs/methods.md#ddu-training): its training recipe is not in the original repo; ResNet-18 with
    # SN + mod and a 10% validation split is the paper's Figure 1 model.
    "DirtyMNIST": replace(_MNIST, arch="resnet18", augment="none", val_fraction=0.1, spectral_norm_coeff=3.0,
                          mod=True, epochs=50),
    # Built-in offline sets: small enough for a laptop CPU in seconds.
    "digits": Params(arch="lenet", optimizer="adam", lr=1e-3, epochs=15, batch_size=64, test_batch_size=256,
                     augment="none", out_data="acet_noise"),
    "moons": Params(arch="mlp", optimizer="adam", lr=1e-2, epochs=200, batch_size=128, test_batch_size=512,
                    weight_decay=0.0, augment="none", out_data="uniform", arch_kwargs={"widths": [100, 100]}),
}

# Named alternatives to a dataset's defaults (`train.py --recipe NAME`).
RECIPES: dict[str, dict] = {
    # DDU (docs/methods.md#ddu-training): WRN-28-10 with soft spectral normalisation (coeff 3) and the
    # leaky-ReLU/avg-pool modifications, SGD 0.1 for 350 epochs with x0.1 at epochs 150 and 250, 10% held out for
    # validation.
    "ddu": dict(arch="wrn", optimizer="sgd", lr=0.1, epochs=350, milestones=(150 / 350, 250 / 350),
                spectral_norm_coeff=3.0, mod=True, val_fraction=0.1, augment="ddu", dropout=0.3),
    # ACET (docs/methods.md#acet-schedules): the pre-activation ResNet-20 on SVHN/CIFAR, always-on crop augmentation.
    "acet": dict(arch="resnet_small", augment="acet"),
}


def get_params(dataset: str, recipe: str | None = None) -> Params:
    if dataset not in PARAMS:
        raise ValueError(f"no defaults for dataset {dataset!r}; model_params.PARAMS has: {', '.join(PARAMS)}")
    params = PARAMS[dataset]
    if recipe is None:
        return params
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; valid: {', '.join(RECIPES)}")
    return replace(params, **RECIPES[recipe])


# Defaults that a training method adds or replaces, per dataset: `train.py --method M` takes the flags of
# METHOD_PARAMS[M][dataset] before PARAMS (explicit flags win over both). A method absent here uses PARAMS alone.
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
# no augmentation. CCU's GAN baseline: LeNet on MNIST, VGG-13 on its other datasets (a ResNet did not converge).
_GAN_CLASSIFIER = dict(optimizer="adam", lr=2e-4, epochs=100, milestones=(0.6,), gamma=0.1, weight_decay=0.0,
                       batch_size=128, augment="none")
_GAN_VGG = dict(_GAN_CLASSIFIER, arch="vgg13", arch_kwargs={})

GAN_PARAMS: dict[str, GANParams] = {
    "MNIST": GANParams("dcgan28", classifier=_GAN_CLASSIFIER),
    "FMNIST": GANParams("dcgan28", classifier=_GAN_VGG),
    "SVHN": GANParams("dcgan32", classifier=_GAN_VGG),
    "CIFAR10": GANParams("dcgan32", gan_beta=0.1, classifier=dict(_GAN_VGG, batch_size=64)),
    "CIFAR100": GANParams("dcgan32", gan_beta=0.1, classifier=_GAN_VGG),  # not in the original: as CIFAR-10
    # built-in 8x8 digits: a narrow G/D, the dataset's own classifier defaults (the demo's budget)
    "digits": GANParams("dcgan8", gan_width=32),
}

METHOD_PARAMS: dict[str, dict] = {"gan": GAN_PARAMS}


def method_params(method: str, dataset: str) -> dict:
    """The flags `--method method` sets by default on `dataset` (empty for methods without own defaults)."""
    if method not in METHOD_PARAMS:
        return {}
    if dataset not in METHOD_PARAMS[method]:
        raise ValueError(f"no {method} defaults for dataset {dataset!r}; model_params.METHOD_PARAMS[{method!r}] "
                         f"has: {', '.join(METHOD_PARAMS[method])}")
    params = asdict(METHOD_PARAMS[method][dataset])
    return {**{k: v for k, v in params.items() if k != "classifier"}, **params["classifier"]}
