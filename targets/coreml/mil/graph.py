"""The compiled form of an ML program: per function, its typed inputs / states / outputs, the constants
folded at load, and a block of steps (nodes) the interpreter walks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from targets.coreml.mil.values import TensorType


@dataclass
class Node:
    type: str
    args: list                      # [(param, kind, payload)]: kind "n" name, "v" value, "t" tuple of (kind, payload)
    outputs: list[str]
    out_types: list                 # TensorType | None per output
    casts: list                     # callable per output
    function: str
    blocks: list = field(default_factory=list)   # nested Block for cond / while_loop
    impl: Callable | None = None


@dataclass
class Block:
    inputs: list[str]
    steps: list[Node]
    outputs: list[str]


class Function:
    def __init__(self, name: str):
        self.name = name
        self.inputs: dict[str, TensorType] = {}
        self.states: dict[str, TensorType] = {}
        self.outputs: dict[str, TensorType | None] = {}
        self.ranges: dict[str, list[tuple[int, int]]] = {}
        self.consts: dict[str, Any] = {}
        self.block: Block | None = None


def where(node: Node) -> str:
    return f"in function '{node.function}', output '{node.outputs[0] if node.outputs else '?'}'"
