"""The training-method interface: one loss function per method, its flags (with their ranges) and defaults, plus
optional hooks for the training loop."""
from __future__ import annotations

import argparse
from argparse import Namespace
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

# loss(model, x, y, x_out, opts) -> (scalar loss, logits of the clean batch x)
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, Optional[torch.Tensor], Namespace],
                  "tuple[torch.Tensor, torch.Tensor]"]


@dataclass
class Auxiliary:
    """Networks a method trains beside the classifier (a GAN's generator and discriminator, ProoD's
    discriminator), each with its optimiser and optionally an lr scheduler, all keyed by one name.

    The loop saves them in the run's model.pt beside the classifier (see `state_dict`), restores them on
    `--resume`, steps every scheduler once per epoch after the classifier's, and logs the epoch means of the
    scalars a step hook passes to `log`. `update(name, loss)` is the one way a hook steps a network: it
    back-propagates into that network's parameters only, averages their gradients over data-parallel processes
    and takes the optimiser step.
    """

    nets: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler] = field(default_factory=dict)
    _sums: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)
    _counts: dict[str, int] = field(default_factory=dict, init=False, repr=False)

    def update(self, name: str, loss: torch.Tensor) -> None:
        """One optimiser step of `nets[name]` on `loss` (gradients reach no other network's parameters)."""
        from utils.training import average_gradients  # lazy: the training loop imports the methods

        net, optimizer = self.nets[name], self.optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=[p for p in net.parameters() if p.requires_grad])
        average_gradients(net)
        optimizer.step()

    def log(self, **scalars: torch.Tensor) -> None:
        """Accumulate scalar tensors (kept on their device, no sync) for this epoch's log line."""
        for key, value in scalars.items():
            self._sums[key] = self._sums.get(key, 0.0) + value.detach().float()
            self._counts[key] = self._counts.get(key, 0) + 1

    def epoch_stats(self) -> dict[str, float]:
        """The means of everything logged since the last call, then reset."""
        stats = {key: float(total) / self._counts[key] for key, total in self._sums.items()}
        self._sums, self._counts = {}, {}
        return stats

    def step_schedulers(self) -> None:
        for scheduler in self.schedulers.values():
            scheduler.step()

    def state_dict(self) -> dict:
        """Checkpoint entries beside "model": {"aux": {name: state_dict}, "aux_optimizers": {...},
        "aux_schedulers": {...}} (plain tensors and numbers, loadable with weights_only=True)."""
        return {"aux": {name: net.state_dict() for name, net in self.nets.items()},
                "aux_optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
                "aux_schedulers": {name: sched.state_dict() for name, sched in self.schedulers.items()}}

    def load_state_dict(self, checkpoint: dict) -> None:
        """Restore from a checkpoint written with `state_dict` (missing entries are an error, not a reset)."""
        if "aux" not in checkpoint:
            raise ValueError(f"the checkpoint has no auxiliary networks; expected {sorted(self.nets)}")
        for name, net in self.nets.items():
            net.load_state_dict(checkpoint["aux"][name])
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(checkpoint["aux_optimizers"][name])
        for name, scheduler in self.schedulers.items():
            scheduler.load_state_dict(checkpoint["aux_schedulers"][name])


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: a group shared by methods is added once
class FlagGroup:
    """train.py flags declared together: `add(group)` adds them (with their defaults) to an argparse argument
    group that train.py titles `title` plus the methods that reference it; `ranges` are their allowed numbers
    (`utils.cli.Range` by argparse dest), checked before any run folder is made, also on `--resume`.

    A method lists the groups it reads in `Method.flags`: its own, and shared ones (`utils.methods.shared`)."""

    title: str
    add: Callable[[argparse._ArgumentGroup], None]
    ranges: Mapping[str, Any] = field(default_factory=dict)


# aux_step(model, aux, x, y, x_out, opts) -> the out batch for the classifier's loss (or None)
AuxStepFn = Callable[[nn.Module, Auxiliary, torch.Tensor, torch.Tensor, Optional[torch.Tensor], Namespace],
                     Optional[torch.Tensor]]


@dataclass(frozen=True)
class Method:
    """A training objective for `train.py --method`.

    loss: the objective on one batch (see `LossFn`).
    flags: the `FlagGroup`s of the flags the method reads (its own and shared ones); train.py's parser holds
        the flags of every registered method, so every run's config.json has the same keys.
    defaults: `model_params.Params` fields the method replaces on every dataset, before `--recipe` (ACET's
        weight decay).
    dataset_defaults: optional `fn(dataset) -> {flag dest: value}`, the method's defaults on that dataset, over
        the dataset's, the method's `defaults` and `--recipe` (the GAN's classifier and G/D); None values keep
        the dataset's. Flags given on the command line win over all of them.
    uses_out_data: the loop draws an out-distribution batch `x_out` from `--out-data` for every step.
    wrap_model: optional `fn(model, opts, init) -> model` applied after the backbone is built (CCU wraps it).
        With init=True (start of training) it may read other run folders named in opts (CCU's `--gmm`); with
        init=False (`utils.methods.load_run`) it must build the structure from the saved config alone, since the
        checkpoint's state_dict supplies every tensor.
    param_groups: optional `fn(model, opts) -> list[dict]` of optimiser groups (CCU: GMMs get their own lr).
    after_step: optional `fn(model, opts) -> None` called after every optimiser step (CCU's variance clamp).

    Auxiliary networks (a method that trains more than the classifier, e.g. the confident-classifier GAN):
    auxiliary: optional `fn(model, opts) -> Auxiliary`, called once after the classifier is built and moved to
        its device; it builds the networks on that device (in training mode) with their optimisers and
        schedulers, from opts alone (it is also how `utils.methods.load_auxiliary` rebuilds them from a run).
    aux_step: `AuxStepFn`, called at every step before the classifier's loss, with the clean batch (x, y) and
        the loop's out batch (`x_out`, None unless `uses_out_data`). It updates the auxiliary networks through
        `aux.update(name, loss)`, may `aux.log(name=scalar)` for log.jsonl, and returns the out batch the
        classifier's `loss` receives (e.g. fresh generated samples, detached). The classifier's own step is
        unchanged: `loss` -> backward -> averaged gradients -> optimiser step.
    Saved as model.pt {"model": classifier, ..., "aux": {name: state_dict}, "aux_optimizers": {name: ...},
    "aux_schedulers": {name: ...}}; detectors, studies and tables read "model" only and never see the rest.
    """

    loss: LossFn
    flags: tuple[FlagGroup, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    dataset_defaults: Optional[Callable[[str], Mapping[str, Any]]] = None
    uses_out_data: bool = False
    wrap_model: Optional[Callable] = None
    param_groups: Optional[Callable] = None
    after_step: Optional[Callable] = None
    auxiliary: Optional[Callable[[nn.Module, Namespace], Auxiliary]] = None
    aux_step: Optional[AuxStepFn] = None
