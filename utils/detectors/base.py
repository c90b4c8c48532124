"""The detector interface: a post-hoc score that maps inputs to a confidence (higher = more in-distribution)."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from models.hooked import with_features


def model_outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate features, logits of the model's own output) of one forward pass.

    A model whose output is not head(features) (CCU: the GMMs enter the output, or a network given features by
    a forward hook, `models.hooked`) provides `forward_with_features(x)`; every other model composes its
    features and head.
    """
    if hasattr(model, "forward_with_features"):
        return model.forward_with_features(x)
    features = model.features(x)
    return features, model.head(features)


def num_classes_of(model: nn.Module, features: torch.Tensor) -> int:
    """The output width: a hooked network's (known after a pass, whatever its features layer), else head's."""
    return getattr(model, "num_outputs", None) or model.head(features).shape[1]


class Detector:
    """Base class of every detector in `utils.detectors.DETECTORS`.

    A detector is built from a trained model (or, for ensembles, a list of models) plus named options, may be
    fitted on a loader of (x, y) batches, and returns one confidence per input, where a higher value means
    "more in-distribution" (the sign convention of `utils.metrics`).

    Detectors that only need the penultimate features and the logits of one forward pass set
    `needs_grad = False` and implement `from_outputs`; evaluation then runs the network once per batch and feeds
    every such detector. Detectors that need input gradients or several passes override `confidence`.

    What evaluation needs to know about a detector, it declares here (nothing lists detector names elsewhere):
    `tunable` (it has `tune(loader_in, loader_out, criterion=, fpr_convention=)`, which evaluate.py calls on
    `--tune-ood`), `returns_probability` (its confidence is a probability, so CCU's attack table reports its log;
    a detector whose option changes that sets it per instance), `needs_features` (it reads the penultimate
    features, not only logits or the input) and `ensemble` (it is built from the list of a table entry's runs).
    """

    needs_grad: bool = False
    tunable: bool = False
    returns_probability: bool = False
    needs_features: bool = False
    ensemble: bool = False

    def __init__(self, model: nn.Module) -> None:
        # any logits network works: one without features()/head() gets them by a forward hook (the input of its
        # last nn.Linear; models.hooked.with_features(net, "NAME") chooses another module)
        self.model = with_features(model) if isinstance(model, nn.Module) else model

    def fit(self, loader: Iterable) -> "Detector":
        """Fit detector statistics on a loader of (x, y) batches; the default has nothing to fit."""
        return self

    def from_outputs(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} needs the input, call confidence(x)")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) confidences of a batch of inputs in [0, 1]: `confidence(x)`, higher = more in-distribution."""
        return self.confidence(x)

    @torch.no_grad()
    def confidence(self, x: torch.Tensor) -> torch.Tensor:
        """The score of the model's own output (for CCU: its log-probabilities, not the base classifier's)."""
        return self.from_outputs(*model_outputs(self.model, x))
