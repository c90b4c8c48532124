"""The classifier's training defaults per dataset, and named recipes (see docs/methods.md). Numbers and names
only; nothing runs at import.

This file holds `PARAMS` (per dataset: architecture, optimiser, lr, epochs, batches, schedule, augmentation,
training out-distribution, ...), `NORMALIZATIONS` and `RECIPES` (`--recipe NAME`). A `train.py` flag that
defaults to None takes, in this order (later wins, a flag given on the command line over all):

1. `PARAMS[dataset]`;
2. the method's `defaults` (`utils.methods.base.Method.defaults`; ACET/CEDA's weight decay in
   `utils/methods/noise.py`);
3. `RECIPES[recipe]` for that dataset, when `--recipe` names one;
4. the method's `dataset_defaults(dataset)`: `GAN_PARAMS` in `utils/methods/gan.py`, `GOOD_PARAMS` and
   `PROOD_PARAMS` in `utils/methods/certified.py`.

Every other default lives with what it configures, once: a method's own flags in its file under
`utils/methods/` (GOOD/ProoD's eps, kappa and ramps: `CERTIFIED_EPS`, `DEFAULT_KAPPA`, `RAMPS` in
`utils/methods/certified.py`), the flags several methods share in `utils/methods/shared.py`, the PGD attack's
(eps 0.3, 40 steps; 80 in evaluate.py) in `utils.attacks.PGD_DEFAULTS`, and each script's own flags in its parser.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping


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
    normalize: str | None = None        # a key of NORMALIZATIONS: the model's first layer, (x - mean) / std
    arch_kwargs: dict = field(default_factory=dict)


# Input normalisations, (per-channel mean, per-channel std) of pixels in [0, 1]. The model carries the one its
# recipe names as its first layer (models.common.Normalize); CCU's and ACET's networks take raw pixels.
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    # DDU: the CIFAR-10 training statistics, for CIFAR-10, CIFAR-100 and SVHN alike
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    # ODIN's DenseNet-BC / WRN-28-10: (125.3, 123.0, 113.9) / 255 and (63.0, 62.1, 66.7) / 255
    "odin": ((125.3 / 255, 123.0 / 255, 113.9 / 255), (63.0 / 255, 62.1 / 255, 66.7 / 255)),
    # DDU's Dirty-MNIST (and MNIST) models
    "mnist": ((0.1307,), (0.3081,)),
}


def normalization(name: str | None) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) of a NORMALIZATIONS key; None or "none" means raw [0, 1] pixels."""
    if name is None or name == "none":
        return None
    if name not in NORMALIZATIONS:
        raise ValueError(f"unknown normalisation {name!r}; valid: none, {', '.join(NORMALIZATIONS)}")
    return NORMALIZATIONS[name]


# CCU's run_training.py lowers the lr before 1-indexed epochs 50, 75 and 90, i.e. after 49, 74 and 89 finished
# epochs (train.py's milestones count finished epochs, as torch's MultiStepLR does).
_CCU_MILESTONES = (49 / 100, 74 / 100, 89 / 100)
_MNIST = Params(arch="lenet", optimizer="adam", lr=1e-3, epochs=100, milestones=_CCU_MILESTONES)
_SGD = dict(optimizer="sgd", lr=0.1, epochs=100, milestones=_CCU_MILESTONES)

PARAMS: dict[str, Params] = {
    "MNIST": _MNIST,
    "FMNIST": Params(arch="resnet18", **_SGD),
    "SVHN": Params(arch="resnet18", **_SGD),
    "CIFAR10": Params(arch="resnet18", **_SGD),
    "CIFAR100": Params(arch="resnet18", **_SGD),
    # DDU's Dirty-MNIST (docs/methods.md#ddu-training): its training recipe is not in the original repo; ResNet-18 with
    # SN + mod and a 10% validation split is the paper's Figure 1 model.
    "DirtyMNIST": replace(_MNIST, arch="resnet18", augment="none", val_fraction=0.1, spectral_norm_coeff=3.0,
                          mod=True, epochs=50, normalize="mnist"),
    # Built-in offline sets: small enough for a laptop CPU in seconds.
    "digits": Params(arch="lenet", optimizer="adam", lr=1e-3, epochs=15, batch_size=64, test_batch_size=256,
                     augment="none", out_data="acet_noise"),
    "moons": Params(arch="mlp", optimizer="adam", lr=1e-2, epochs=200, batch_size=128, test_batch_size=512,
                    weight_decay=0.0, augment="none", out_data="uniform", arch_kwargs={"widths": [100, 100]}),
}

@dataclass(frozen=True)
class Recipe:
    """Named alternative defaults (`train.py --recipe NAME`): `common` for every dataset, `per_dataset` on top."""
    common: dict
    per_dataset: dict[str, dict] = field(default_factory=dict)

    def overrides(self, dataset: str) -> dict:
        return {**self.common, **self.per_dataset.get(dataset, {})}


_GREY = ("MNIST", "FMNIST", "DirtyMNIST", "digits")   # 1-channel sets: the papers' small-image networks

RECIPES: dict[str, Recipe] = {
    # DDU (arXiv 2102.11582): WRN-28-10 with soft spectral normalisation (coeff 3) and the leaky-ReLU/avg-pool
    # modifications, SGD 0.1 for 350 epochs with x0.1 after epochs 150 and 250, 10% held out for validation,
    # inputs normalised with the CIFAR-10 statistics (also for CIFAR-100 and SVHN). Its Dirty-MNIST models are
    # ResNet-18 + SN with MNIST statistics and no augmentation.
    "ddu": Recipe(
        dict(arch="wrn", optimizer="sgd", lr=0.1, epochs=350, milestones=(150 / 350, 250 / 350),
             spectral_norm_coeff=3.0, mod=True, val_fraction=0.1, augment="ddu", dropout=0.3, normalize="cifar10"),
        {name: dict(arch="resnet18", dropout=0.0, augment="none", normalize="mnist") for name in _GREY}),
    # ACET (arXiv 1812.05720): LeNet with Adam 1e-3 on MNIST (the dataset default), the pre-activation ResNet-20
    # with momentum SGD 0.1 on SVHN/CIFAR; always-on crop augmentation; x0.1 after 50/75/90% of training; weight
    # decay 1e-3 (the loss's 5e-4 * sum ||W||^2) for the plain models of its tables too; raw pixels.
    "acet": Recipe(
        dict(arch="resnet_small", augment="acet", weight_decay=1e-3, milestones=(0.5, 0.75, 0.9)),
        {**{name: dict(arch="lenet") for name in _GREY}, "moons": dict(arch="mlp", augment="none")}),
    # CCU's MC-dropout baseline (arXiv 1909.12180): VGG-13 (LeNet on MNIST) with dropout 0.5 kept active at test
    # time, Adam 2e-4, CCU's schedule.
    "mcd": Recipe(dict(arch="vgg13", optimizer="adam", lr=2e-4, dropout=0.5),
                  {name: dict(arch="lenet") for name in _GREY}),
    # ODIN's networks (arXiv 1706.02690) take inputs normalised with its CIFAR statistics. Its repository ships
    # weights, not training code; these are the DenseNet-BC and Wide-ResNet papers' CIFAR recipes, which the
    # ODIN paper says it follows (without their Nesterov momentum; see docs/methods.md#odin-networks).
    "odin-densenet": Recipe(dict(arch="densenet_bc100", optimizer="sgd", lr=0.1, epochs=300, batch_size=64,
                                 weight_decay=1e-4, milestones=(0.5, 0.75), augment="ddu", dropout=0.0,
                                 normalize="odin")),
    "odin-wrn": Recipe(dict(arch="wrn", optimizer="sgd", lr=0.1, epochs=200, batch_size=128, weight_decay=5e-4,
                            milestones=(60 / 200, 120 / 200, 160 / 200), gamma=0.2, augment="ddu", dropout=0.3,
                            normalize="odin")),
}


def get_params(dataset: str, recipe: str | None = None, method_defaults: Mapping[str, Any] | None = None) -> Params:
    """PARAMS[dataset], then a method's `defaults` (`utils.methods.base.Method.defaults`), then RECIPES[recipe]
    for that dataset."""
    if dataset not in PARAMS:
        raise ValueError(f"no defaults for dataset {dataset!r}; model_params.PARAMS has: {', '.join(PARAMS)}")
    params = replace(PARAMS[dataset], **(method_defaults or {}))
    if recipe is None:
        return params
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; valid: {', '.join(RECIPES)}")
    return replace(params, **RECIPES[recipe].overrides(dataset))
