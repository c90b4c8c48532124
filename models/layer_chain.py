"""The layers of a chain-shaped network in forward order, found by a torch.fx trace, whatever its class or
attribute names.

A network is a chain when every operation of its forward pass takes the previous operation's output as its only
tensor input (a residual connection, a concatenation or a second input is not). Modules for which `is_leaf`
holds are kept whole; other modules are traced through. Functional spellings are mapped to the layers they
compute: F.relu / torch.relu / x.relu() -> nn.ReLU, F.leaky_relu -> nn.LeakyReLU, torch.flatten(x, 1) /
x.flatten(1) -> nn.Flatten, x.view(...) / x.reshape(...) with sizes that are integers or the batch size
x.size(0) / x.shape[0] -> `Reshape`. Anything else raises
`NotAChainError` naming the first operation that is not a supported chain step and the module it sits in.
"""
from __future__ import annotations

import operator
from typing import Callable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn


class NotAChainError(ValueError):
    """The network's forward pass is not a chain of supported layers."""


class _ScopedTracer(fx.Tracer):
    """A tracer that keeps modules with `is_leaf` whole and records, for every node, the module it sits in."""

    def __init__(self, is_leaf: Callable[[nn.Module], bool]) -> None:
        super().__init__()
        self.keep_whole = is_leaf

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return self.keep_whole(module) or super().is_leaf_module(module, qualified_name)

    def create_node(self, *args, **kwargs) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta["scope"] = next(reversed(self.module_stack), "") if self.module_stack else ""
        return node


def chain_layers(model: nn.Module, is_leaf: Callable[[nn.Module], bool]) -> list[nn.Module]:
    """The layers whose composition is model.forward, in order; NotAChainError when it is not a chain."""
    name = type(model).__name__
    try:
        graph = _ScopedTracer(is_leaf).trace(model)
    except Exception as error:  # noqa: BLE001 (control flow on values, unsupported Python: any trace failure)
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise NotAChainError(f"{name}: torch.fx cannot trace its forward pass ({first}); pass its layers as a "
                             "list instead") from error
    modules = dict(model.named_modules())
    layers: list[nn.Module] = []
    current: Optional[fx.Node] = None
    batch_nodes: set[fx.Node] = set()  # x.size(0) / x.shape[0] of a chain value: the batch size
    shape_nodes: set[fx.Node] = set()  # x.shape / x.size() of a chain value
    for node in graph.nodes:
        if node.op == "placeholder":
            if current is not None:
                raise NotAChainError(f"{name}: its forward pass takes more than one input ({node.target!r})")
            current = node
        elif node.op == "output":
            if node.args[0] is not current:
                raise NotAChainError(f"{name}: its output is not the last operation of a chain")
        elif _is_shape_of(node, current, shape_nodes):
            (batch_nodes if _is_batch(node, shape_nodes) else shape_nodes).add(node)
        else:
            layer = _as_layer(node, modules, current, batch_nodes)
            if node.op == "call_module" and not is_leaf(modules[node.target]):
                layer = None  # a torch.nn layer the tracer keeps whole but that has no bound
            if layer is None:
                raise NotAChainError(f"{name}: cannot bound {describe(node, modules)}")
            layers.append(layer)
            current = node
    return layers


def describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """'module 'block.1' (Tanh)', 'function tanh in module 'block'', 'method .sigmoid() at the top level'."""
    if node.op == "call_module":
        return f"module {node.target!r} ({type(modules[node.target]).__name__})"
    what = (f"function {getattr(node.target, '__name__', node.target)}" if node.op == "call_function"
            else f"method .{node.target}()" if node.op == "call_method" else f"{node.op} {node.target}")
    scope = node.meta.get("scope", "")
    return f"{what} in module {scope!r}" if scope else f"{what} (in forward itself)"


def _is_shape_of(node: fx.Node, current: Optional[fx.Node], shape_nodes: set) -> bool:
    """x.size(...), x.shape or x.shape[i] of the current chain value (integers, not a chain step)."""
    if node.op == "call_method" and node.target == "size":
        return node.args[0] is current
    if node.op == "call_function" and node.target is getattr:
        return node.args[0] is current and node.args[1] == "shape"
    return node.op == "call_function" and node.target is operator.getitem and node.args[0] in shape_nodes


def _is_batch(node: fx.Node, shape_nodes: set) -> bool:
    if node.op == "call_method":
        return node.args[1:] == (0,) or node.kwargs == {"dim": 0}
    return node.target is operator.getitem and node.args[0] in shape_nodes and node.args[1] == 0


_RELU = (F.relu, torch.relu)


def _as_layer(node: fx.Node, modules: dict, current: Optional[fx.Node], batch_nodes: set) -> Optional[nn.Module]:
    """The layer one chain step computes, or None when the node is not a supported step on `current`."""
    if not node.args or node.args[0] is not current:
        return None
    rest = list(node.args[1:]) + list(node.kwargs.values())
    if node.op == "call_module":
        return modules[node.target] if not rest else None
    target = node.target
    if (node.op == "call_function" and target in _RELU) or (node.op == "call_method" and target == "relu"):
        return nn.ReLU() if all(isinstance(v, bool) for v in rest) else None  # the inplace flag only
    if node.op == "call_function" and target is F.leaky_relu:
        slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
        return nn.LeakyReLU(slope) if isinstance(slope, float) else None
    if (node.op == "call_function" and target is torch.flatten) or (node.op == "call_method" and target == "flatten"):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return nn.Flatten(start, end) if start == 1 and end == -1 else None
    if node.op == "call_method" and target in ("view", "reshape") and not node.kwargs:
        shape = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
        if all(isinstance(size, int) or size in batch_nodes for size in shape):
            return Reshape(tuple(None if size in batch_nodes else size for size in shape))
    return None


class Reshape(nn.Module):
    """x.reshape(shape) with None standing for the batch size x.shape[0]: an elementwise re-indexing, which
    interval bounds follow exactly (the same re-indexing of the lower and the upper bound)."""

    def __init__(self, shape: tuple) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(tuple(x.shape[0] if size is None else size for size in self.shape))

    def extra_repr(self) -> str:
        return f"shape={self.shape}"
