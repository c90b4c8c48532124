"""Scores of a predictive distribution averaged over several stochastic or independent networks.

* MC dropout (Gal & Ghahramani, ICML 2016, arXiv 1506.02142): T passes with dropout active at test time.
* Deep ensembles (Lakshminarayanan et al., NeurIPS 2017, arXiv 1612.01474): the mean of M members' softmaxes.

Both need the input itself (several passes), so `needs_grad = True` marks them as "call confidence(x)", like
ODIN; their passes run without gradients.
"""
from __future__ import annotations

from contextlib import contextmanager
import math
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from utils.detectors.base import Detector
from utils.detectors.common import check_choice

ENTROPY_EPS = 1e-12  # DDU's constant inside every log (docs/methods.md#ensembles)
SCORES = ("max_prob", "entropy", "mutual_info", "variance")
_DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def entropy(probs: torch.Tensor, eps: float = ENTROPY_EPS, bits: bool = False) -> torch.Tensor:
    """-sum_k p_k log(p_k + eps) over the last axis, in nats, or in bits (log2) with `bits`; (..., K) -> (...)."""
    log = torch.log2 if bits else torch.log
    return -(probs * log(probs + eps)).sum(dim=-1)


def mutual_information(probs: torch.Tensor, eps: float = ENTROPY_EPS, bits: bool = False,
                       predictive_entropy: Optional[torch.Tensor] = None) -> torch.Tensor:
    """max(H(mean_s p_s) - mean_s H(p_s), 0) of (S, N, K) probabilities -> (N,) (Depeweg et al. 2018, eq. 7-8).

    MI >= 0 since the entropy is concave, but the difference of two equal entropies can round to -2e-16 (identical
    samples), hence the clamp. `predictive_entropy` is H(mean_s p_s) where the caller has it already (the toy
    study's, clamped at 0)."""
    if predictive_entropy is None:
        predictive_entropy = entropy(probs.mean(dim=0), eps, bits)
    return (predictive_entropy - entropy(probs, eps, bits).mean(dim=0)).clamp_min(0.0)


def class_variance(probs: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
    """Population variance over the S samples of each class probability, summed (CCU's MCD score) or averaged
    (`reduce="mean"`, Know your limits) over the K classes; (S, N, K) -> (N,)."""
    variance = probs.var(dim=0, unbiased=False)
    return variance.sum(dim=-1) if check_choice("reduction", reduce, ("sum", "mean")) == "sum" else variance.mean(dim=-1)


def max_mean_prob(probs: torch.Tensor) -> torch.Tensor:
    """max_k mean_s p_s(k) of (S, N, K) probabilities -> (N,)."""
    return probs.mean(dim=0).amax(dim=-1)


def predictive_confidence(probs: torch.Tensor, score: str) -> torch.Tensor:
    """(S, N, K) per-sample (or per-member) softmaxes -> (N,) confidence, higher = more in-distribution.

    With p_bar = mean_s p_s (computed in float64):
    * "max_prob": max_k p_bar_k (CCU's DE baseline, as a probability instead of its log);
    * "entropy": -PE, PE = -sum_k p_bar_k log(p_bar_k + 1e-12) (DDU's m2 for ensembles);
    * "mutual_info": -MI, MI = max(PE - mean_s H(p_s), 0), each entropy with the +1e-12 (DDU's m1);
    * "variance": -sum_k Var_s p_s(k), population variance over the S samples (CCU's MCD score,
      docs/methods.md#mc-dropout; CCU also multiplies by 1000 and places it at the argmax class, neither of which changes the ranking).
    """
    probs = probs.double()
    if score == "max_prob":
        return max_mean_prob(probs)
    if score == "entropy":
        return -entropy(probs.mean(dim=0))
    if score == "mutual_info":
        return -mutual_information(probs)
    if score == "variance":
        return -class_variance(probs)
    raise ValueError(f"unknown score {score!r}; valid: {', '.join(SCORES)}")


def tempered_probs(member_logits: torch.Tensor, temperatures: Optional[Sequence[float]] = None) -> torch.Tensor:
    """softmax(logits_m / T_m) per member m of (M, N, K) logits (T = 1 without `temperatures`); DDU tempers every
    ensemble member on its own validation split."""
    if temperatures is None:
        return member_logits.softmax(dim=-1)
    if len(temperatures) != len(member_logits):
        raise ValueError(f"{len(temperatures)} temperatures for {len(member_logits)} ensemble members")
    scale = torch.as_tensor(temperatures, dtype=member_logits.dtype, device=member_logits.device).view(-1, 1, 1)
    return (member_logits / scale).softmax(dim=-1)


@contextmanager
def dropout_active(model: nn.Module) -> Iterator[None]:
    """Everything in eval mode (BatchNorm uses its running statistics) except the dropout layers."""
    modes = [(module, module.training) for module in model.modules()]
    dropouts = [module for module in model.modules() if isinstance(module, _DROPOUT_TYPES)]
    if not dropouts:
        raise ValueError(f"MC dropout needs dropout layers, and {type(model).__name__} has none "
                         "(train it with --dropout > 0)")
    model.eval()
    for module in dropouts:
        module.train()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


class MCDropout(Detector):
    """MC-dropout score from `samples` stochastic passes: see `predictive_confidence` for the scores.

    Dropout layers run in train mode, everything else (BatchNorm) in eval mode; the model's modes are restored
    afterwards. Masks come from torch's global generator, so results repeat under `torch.manual_seed`.
    CCU's MCD baseline: LeNet / VGG13 with dropout 0.5, 10 samples, score="variance".
    """

    needs_grad = True
    returns_probability = True  # with score "max_prob" (per instance)

    def __init__(self, model: nn.Module, samples: int = 10, score: str = "max_prob") -> None:
        super().__init__(model)
        if samples < 1:
            raise ValueError(f"MC dropout needs samples >= 1, got {samples}")
        self.samples = int(samples)
        self.score = check_choice("MC-dropout score", score, SCORES)
        self.returns_probability = self.score == "max_prob"

    @torch.no_grad()
    def sample_probs(self, x: torch.Tensor) -> torch.Tensor:
        """(samples, N, K) softmax outputs of the stochastic passes."""
        with dropout_active(self.model):
            return torch.stack([self.model(x).softmax(dim=1) for _ in range(self.samples)])

    def confidence(self, x: torch.Tensor) -> torch.Tensor:
        return predictive_confidence(self.sample_probs(x), self.score)


class Ensemble(Detector):
    """Deep-ensemble score over the mean of the members' softmaxes: see `predictive_confidence`.

    CCU's DE baseline is score="max_prob" over 5 members (docs/methods.md#ensembles); DDU reports "mutual_info" (m1) and
    "entropy" (m2). A one-member ensemble with score="max_prob" is that member's MSP. Members are used in
    whatever mode they are in (evaluation puts them in eval mode).
    """

    needs_grad = True
    ensemble = True
    returns_probability = True  # with score "max_prob" (per instance)

    def __init__(self, models: Union[nn.Module, Sequence[nn.Module]], score: str = "max_prob") -> None:
        members = [models] if isinstance(models, nn.Module) else list(models)
        if not members:
            raise ValueError("an ensemble needs at least one member model")
        super().__init__(members[0])
        self.models = members
        self.score = check_choice("ensemble score", score, SCORES)
        self.returns_probability = self.score == "max_prob"

    @torch.no_grad()
    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(M, N, K) logits of the members."""
        return torch.stack([member(x) for member in self.models])

    def member_probs(self, x: torch.Tensor) -> torch.Tensor:
        """(M, N, K) softmax outputs of the members."""
        return tempered_probs(self.member_logits(x))

    def confidence(self, x: torch.Tensor) -> torch.Tensor:
        return predictive_confidence(self.member_probs(x), self.score)


def as_one_network(members: Sequence[nn.Module]) -> nn.Module:
    """A run's network, or several runs (a deep ensemble) as one `EnsembleModel`, in eval mode."""
    return members[0] if len(members) == 1 else EnsembleModel(members).eval()


def load_network(run_dirs: Sequence, device: str | torch.device) -> nn.Module:
    """`as_one_network` of the runs in `run_dirs`, loaded on `device`."""
    from utils import methods  # noqa: PLC0415 (load_run rebuilds each member with its method's wrapper)

    return as_one_network([methods.load_run(d, device=device) for d in run_dirs])


class EnsembleModel(nn.Module):
    """A deep ensemble as one differentiable network: log of the mean member softmax, which are valid logits
    (softmax gives back the averaged probabilities), so attacks maximise the ensemble's own confidence."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        log_probs = torch.stack([F.log_softmax(member(x), dim=1) for member in self.members])
        return torch.logsumexp(log_probs, dim=0) - math.log(len(self.members))
