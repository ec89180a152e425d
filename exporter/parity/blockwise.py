"""Blockwise parity (``parity --blockwise``): each decoder layer and vision block of the artifact against the
reference's, on the tensors one held-out prompt produces.

The reference's prefill of one prompt (the first held-out item with an image, else the first) is run with hooks on
every block of ``text.layers`` and ``visual.blocks``; each hook keeps the block's input and output of the method's
first call (the decoder's first text segment, from an empty cache; the image). The target then runs its own blocks
(targets/ort/blocks.py): *isolated*, each fed the reference's input to it, which measures the error that block adds
by itself; *accumulated*, the whole method on the same call's inputs with every block's output exposed, which shows
where the error builds up. Only targets with a ``blocks`` hook offer it (ONNX Runtime: its graphs name each node
after its module); an ExecuTorch or Core ML program does not expose a block's tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.artifact import Progress
from core.components import BLOCK_FAMILIES
from core.errors import BadInputError
from core.metrics import compare, relative_l2
from exporter.parity.reports import fmt


@dataclass
class Capture:
    """One method's first call during the prompt's prefill: its runner inputs and each block's input and output."""

    sample: dict[str, np.ndarray] = field(default_factory=dict)
    inputs: list[np.ndarray | None] = field(default_factory=list)
    outputs: list[np.ndarray | None] = field(default_factory=list)


def check_supported(target_name: str) -> None:
    from targets import get_target

    if not hasattr(get_target(target_name), "blocks"):
        raise BadInputError(f"--blockwise: {target_name} artifacts do not expose a block's tensors (ort does)")


def pick_item(items: list[Any]) -> Any:
    """The first held-out item with an image (so the vision blocks are compared too), else the first."""
    return next((it for it in items if getattr(it, "image", None) is not None), items[0])


def capture(reference: Any, config: Any, tokenizer: Any, item: Any) -> dict[str, Capture]:
    """The reference's prefill of ``item`` with every block's first input and output kept."""
    from core.runner import Prompt, Runner

    model = reference.components.model
    captures: dict[str, Capture] = {}
    hooks = []
    for method, family in BLOCK_FAMILIES.items():
        if method == "vision_encoder" and not config.vision:
            continue
        blocks = model.get_submodule(family)
        cap = captures[method] = Capture(inputs=[None] * len(blocks), outputs=[None] * len(blocks))
        for i, block in enumerate(blocks):
            def pre(module, args, i=i, cap=cap):
                if cap.inputs[i] is None:
                    cap.inputs[i] = args[0].detach().float().numpy().copy()

            def post(module, args, out, i=i, cap=cap):
                if cap.outputs[i] is None:
                    cap.outputs[i] = out.detach().float().numpy().copy()

            hooks += [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]

    class Recorder:  # the reference session, keeping each method's first call's inputs
        def __init__(self, session):
            self.session = session

        def run(self, method, **inputs):
            if method in captures and not captures[method].sample:
                captures[method].sample = {k: np.asarray(v).copy() for k, v in inputs.items()}
            return self.session.run(method, **inputs)

        def reset(self):
            self.session.reset()

    try:
        runner = Runner(Recorder(reference), config, tokenizer)
        runner.prefill(runner.segments(Prompt(text=item.text, image=item.image, audio=item.audio)))
    finally:
        for h in hooks:
            h.remove()
        reference.reset()
    return {m: c for m, c in captures.items() if c.sample and all(x is not None for x in c.inputs)}


def compare_blocks(target: Any, artifact: Any, captures: dict[str, Capture], item: Any,
                   progress: Progress | None = None) -> dict[str, Any]:
    """The target's blocks against the captured reference: per method, one row per block."""
    out: dict[str, Any] = {
        "prompt": {"text": item.text, "image": str(item.image) if item.image else None,
                   "audio": str(item.audio) if item.audio else None},
        "definitions": {
            "isolated": "the artifact's block fed the reference's input to that block, against the reference block's "
                        "output: the error the block adds by itself",
            "accumulated": "the artifact's whole method on the same call's inputs, its block outputs against the "
                           "reference's: the error as it builds up",
        },
        "methods": {},
    }
    for method, cap in captures.items():
        ran = target.blocks(artifact, method, cap.sample, cap.inputs, progress)
        rows = []
        for i, (ref, iso, acc) in enumerate(zip(cap.outputs, ran["isolated"], ran["accumulated"])):
            rows.append({"block": f"{ran['family']}.{i}", "positions": int(np.asarray(ref).size // ref.shape[-1]),
                         "isolated": _metrics(ref, iso), "accumulated": _metrics(ref, acc)})
        out["methods"][method] = rows
    return out


def _metrics(ref: np.ndarray, out: np.ndarray) -> dict[str, Any]:
    m = compare(ref, out)
    m["relative_l2"] = relative_l2(m)
    return m


def lines(section: dict[str, Any]) -> list[str]:
    """The CLI's lines: per method, each block's isolated and accumulated cosine (the worst block named)."""
    out = []
    for method, rows in section["methods"].items():
        if not rows:
            continue
        worst = min(rows, key=lambda r: r["isolated"]["cosine"] if r["isolated"]["cosine"] is not None else -2)
        out.append(f"  blockwise {method}: {len(rows)} blocks, {rows[0]['positions']} positions; worst isolated "
                   f"{worst['block']} cosine {fmt(worst['isolated']['cosine'], 6)}; last accumulated cosine "
                   f"{fmt(rows[-1]['accumulated']['cosine'], 6)}")
        for kind in ("isolated", "accumulated"):
            out.append("    " + " ".join(fmt(r[kind]["cosine"], 4) for r in rows) + f"  ({kind} cosine per block)")
    return out
