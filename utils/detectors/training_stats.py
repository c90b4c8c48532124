"""What the detectors of the issue "Today's detectors" need from a network: the training set's penultimate features
and logits (one pass), the affine last layer (W, b), percentiles and nearest neighbours in plain torch.

Every such detector depends on the network only through features z, logits and (W, b), so a later forward hook
that supplies z and (W, b) for any network needs no change here.
"""
from __future__ import annotations

import weakref
from typing import Iterable

import torch
from torch import nn

from utils.detectors.base import Detector, model_outputs
from utils.detectors.common import model_device

# (N_query x N_bank) similarity blocks of at most this many entries: memory stays ~256 MiB in float32
KNN_BLOCK = 1 << 26


@torch.no_grad()
def collect_outputs(model: nn.Module, loader: Iterable) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features (N, F), logits (N, K), labels (N,)) of a loader of (x, y) batches, from one forward pass each.

    The last result is kept (`_LAST`) and returned again while the model (same object, same parameter
    versions, same train/eval mode) and the data (the loader's dataset, or the loader itself) are the same: so
    the detectors of one run, each fitted by evaluation with its own DataLoader over the same training set,
    share ONE pass over it. Every fit here is invariant to the order of the samples.
    """
    key = _cache_key(model, loader)
    if _LAST and _LAST[0] == key and _LAST[1]() is model and _LAST[2] is _source(loader):
        return _LAST[3]
    device = model_device(model)
    features, logits, labels = [], [], []
    for batch in loader:
        z, out = model_outputs(model, batch[0].to(device))
        features.append(z.float())
        logits.append(out.float())
        labels.append(torch.as_tensor(batch[1]).to(device).long())
    if not features:
        raise ValueError("the training loader is empty: detectors need training features to fit")
    outputs = torch.cat(features), torch.cat(logits), torch.cat(labels)
    _LAST[:] = [key, weakref.ref(model), _source(loader), outputs]
    return outputs


_LAST: list = []  # [key, weak reference to the model, data source, outputs] of the last collect_outputs


def _source(loader: Iterable) -> object:
    return getattr(loader, "dataset", loader)


def _cache_key(model: nn.Module, loader: Iterable) -> tuple:
    """What must not have changed for the cached training outputs to be valid (besides object identity):
    parameter versions (bumped by every in-place update, so a model trained further misses), mode, size."""
    source = _source(loader)
    size = len(source) if hasattr(source, "__len__") else None
    return (id(model), model.training, tuple(p._version for p in model.parameters()), id(source), size)


def clear_cache() -> None:
    """Forget the cached training outputs (frees their memory)."""
    _LAST.clear()


@torch.no_grad()
def head_parameters(model: nn.Module, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W (K, F), b (K,)) of the affine map `model.head`: the parameters of the head's nn.Linear when one matches,
    else read off by probing the head at 0 and at the unit vectors. A head that is not affine is refused."""
    device = model_device(model)
    probe = torch.cat([torch.zeros(1, dim, device=device), torch.eye(dim, device=device)])
    out = model.head(probe).float()
    bias, weight = out[0], (out[1:] - out[0]).T
    for module in reversed(list(model.modules())):
        if (isinstance(module, nn.Linear) and module.bias is not None and module.weight.shape == weight.shape
                and torch.allclose(module.weight.float(), weight, atol=1e-4, rtol=1e-3)
                and torch.allclose(module.bias.float(), bias, atol=1e-4, rtol=1e-3)):
            return module.weight.detach().float().clone(), module.bias.detach().float().clone()
    # a private generator: fitting must not move the global RNG that later draws (attacks, dropout) follow
    z = torch.rand(8, dim, generator=torch.Generator().manual_seed(0)).to(device)
    scale = 1e-3 * (1.0 + out.abs().max())
    if not torch.allclose(model.head(z).float(), z @ weight.T + bias, atol=float(scale) * dim, rtol=1e-3):
        raise ValueError(f"{type(model).__name__}.head is not affine (W z + b): this detector needs the last "
                         f"layer's weight and bias; put the model in eval mode or use a logit detector")
    return weight, bias


def percentile(values: torch.Tensor, p: float) -> torch.Tensor:
    """The p-th percentile of all entries, with numpy's default linear interpolation; by two order statistics,
    since torch.quantile refuses tensors of more than 2^24 entries (60k x 1024 features have 61M)."""
    flat = values.flatten()
    position = p / 100.0 * (flat.numel() - 1)
    low = int(position)
    below = flat.kthvalue(low + 1).values.double()
    above = flat.kthvalue(min(low + 2, flat.numel())).values.double() if position > low else below
    return (below + (position - low) * (above - below)).to(values.dtype)


def topk_similarities(queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """(N, k) largest inner products of each query with the rows of `bank`, in descending order, by chunked
    matrix products and a running top-k (memory O(N k + block), no index library)."""
    if k > bank.shape[0]:
        raise ValueError(f"k = {k} nearest neighbours asked, but the training bank holds {bank.shape[0]} "
                         f"features; pass a smaller k")
    chunk = max(k, KNN_BLOCK // max(1, queries.shape[0]))
    best = None
    for start in range(0, bank.shape[0], chunk):
        block = queries @ bank[start:start + chunk].T
        best = block if best is None else torch.cat([best, block], dim=1)
        best = best.topk(min(k, best.shape[1]), dim=1).values
    return best


def check_in(name: str, value: float, low: float, high: float) -> float:
    if not low <= value <= high:
        raise ValueError(f"{name} must lie in [{low}, {high}], got {value}")
    return float(value)


def check_count(name: str, value: int) -> int:
    if int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return int(value)


class HeadDetector(Detector):
    """A detector that passes (modified) penultimate features through the last layer (W, b), read off the model
    on first use (nothing of the training set is needed, so evaluation does not call a fit)."""

    needs_grad = False
    needs_features = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        """W z + b: the logits of (modified) features z through the last layer."""
        if self.weight is None:
            self.weight, self.bias = head_parameters(self.model, features.shape[1])
        return features @ self.weight.to(features).T + self.bias.to(features)


class TrainStatsDetector(HeadDetector):
    """A detector fitted on the training set's features and logits, collected in one pass by `fit`.

    `fit_outputs(features, logits, labels)` does the fitting, so a caller that already holds those tensors (a
    shared pass over the training set, or a forward hook) can fit without running the network again.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.fitted = False

    @torch.no_grad()
    def fit(self, loader: Iterable) -> "TrainStatsDetector":
        return self.fit_outputs(*collect_outputs(self.model, loader))

    def fit_outputs(self, features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor
                    ) -> "TrainStatsDetector":
        self._fit(features.float(), logits.float(), labels.long())
        self.fitted = True
        return self

    def _fit(self, features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        raise NotImplementedError

    def check_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(train_loader) first")
