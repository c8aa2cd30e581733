"""Matching of module/function chains (patterns) in an FX graph.

Mirrors torch.ao.pruning._experimental.pruner.match_utils: a pattern is a tuple of elements, each
an nn.Module class (matches a call_module node of exactly that class, looked through
parametrizations), a function (a call_function node calling it), a string (a node with that target,
e.g. "output") or MatchAllNode (anything). A chain follows the first user of each node.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.fx import Node
from torch.nn.utils.parametrize import type_before_parametrizations

__all__ = ["MatchAllNode", "apply_match"]


class MatchAllNode:
    """Pattern element that matches any node (sparsity_ext's own, so torch.ao.quantization is not needed)."""


def _match(modules: dict[str, nn.Module], node: Node, current: Any) -> bool:
    """Whether `node` matches the single pattern element `current`."""
    if isinstance(current, type) and issubclass(current, MatchAllNode):
        return True
    if not isinstance(node, Node):
        return False
    if isinstance(current, type) and issubclass(current, torch.nn.Module):
        return node.op == "call_module" and type_before_parametrizations(modules[node.target]) == current
    if callable(current):
        return node.op == "call_function" and node.target is current
    if isinstance(current, str):
        return node.target == current
    return False


def apply_match(modules: dict[str, nn.Module], pattern: tuple[Any, ...] | Any, node: Node,
                matched_node_pattern: list[Node]) -> list[Node] | None:
    """The nodes matched by `pattern` starting at `node` (appended to matched_node_pattern), or None.

    Each next element is matched against the first user of the previous node only.
    """
    if not isinstance(pattern, tuple):
        return [node] if _match(modules, node, pattern) else None
    if not pattern or not _match(modules, node, pattern[0]):
        return None
    matched = matched_node_pattern + [node]
    if len(pattern) == 1:
        return matched
    if not isinstance(node, Node) or not node.users:
        return None
    return apply_match(modules, pattern[1:], next(iter(node.users)), matched)
