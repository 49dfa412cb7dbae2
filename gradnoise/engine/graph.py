"""Which gradient edges to request from ``torch.autograd.grad`` so that the hooks of layers
whose parameters are not differentiated still run."""

from __future__ import annotations

from torch import Tensor
from torch.autograd.graph import get_gradient_edge

from gradnoise.engine.hooks import ModuleCall

__all__ = ["hook_edges"]


def hook_edges(calls: list[ModuleCall], wanted_leaves: list[Tensor], differentiated: set[str]) -> list:
    """Gradient edges of skipped layers' outputs (``calls``, in forward order) to request
    from ``autograd.grad`` so that every such layer's output hook runs.

    The engine runs a node, and the hooks on its output, only if a requested input lies
    below it. A layer with a requested parameter or layer below it needs no request of its
    own (then its output gradient is not held until the backward pass ends, as requested
    ones are), nor one with a parameter of its own differentiated; one with nothing below
    (``last``: no input needs a gradient) is requested, and its hook releases what is
    captured. A captured call (``inner``: an RNN's, an attention layer's) is requested at its
    innermost hooked tensors (an RNN's first-layer gates, the input projection), whose
    gradient passes through all its hooks, unless its input leads to a request.
    Releases the calls' outputs (only edges are kept).
    """
    targets = None  # AccumulateGrad nodes of the wanted leaves and requested nodes, if needed
    edges = []
    for c in calls:
        output, c.output = c.output, None
        if c.module in differentiated:  # its node runs for its own parameters
            continue
        if c.inner is not None:  # a captured call: its innermost tensors, unless its input leads on
            x = c.args[0]
            if isinstance(x, Tensor) and x.requires_grad:
                if targets is None:
                    targets = {get_gradient_edge(t).node for t in wanted_leaves} | {e.node for e in edges}
                node = get_gradient_edge(x).node
                if node in targets or reaches(node, targets):
                    continue
            edges.extend(c.inner[0])
            if targets is not None:
                targets.update(e.node for e in c.inner[0])
            continue
        c.last = not any(isinstance(t, Tensor) and t.requires_grad for t in c.args)
        edge = output  # the edge kept at the forward pass
        if not c.last:
            if targets is None:
                targets = {get_gradient_edge(t).node for t in wanted_leaves} | {e.node for e in edges}
            if reaches(edge.node, targets):
                continue
        edges.append(edge)
        if targets is not None:
            targets.add(edge.node)
    return edges


def reaches(node, targets: set) -> bool:
    """Whether one of ``targets`` (autograd nodes) lies below ``node`` in the graph."""
    stack, seen = [node], {node}
    while stack:
        for child, _ in stack.pop().next_functions:
            if child is None or child in seen:
                continue
            if child in targets:
                return True
            seen.add(child)
            stack.append(child)
    return False
