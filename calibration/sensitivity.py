"""INT8 layer sensitivity and the mixed-precision (keep-in-float) fallback.

Eager PyTorch fake quantization, on the calibration samples recorded by
:func:`calibration.stats.calibrate`: a layer's weights are quantized per
output channel, symmetric int8, and its input as the export recipe will
quantize it (the ``scheme``: the target spec's :class:`core.recipes.QuantScheme` for the recipe):

* ``w8a8`` (int8-static on every target): per tensor, symmetric int8, with the
  range from the calibration statistics (absmax);
* ``w8`` (int8-weight on ONNX Runtime and Core ML): left float;
* ``w8da8`` (ExecuTorch's int8-weight and 8da4w, XNNPACK's qd8 kernels): per
  row (token), asymmetric int8, from that row's own range at run time.

Simulating the wrong scheme misleads the search: static inputs for a
weight-only recipe keep layers in float that it handles, float inputs for a
dynamic-input recipe keep too few.

* :func:`layer_sensitivity` quantizes one nn.Linear at a time and ranks the
  layers by the SQNR (dB) of their method's output against float, worst first.
* :func:`choose_keep_float` quantizes every layer and, greedily by that
  ranking, keeps the most sensitive ones in float until every method's
  worst-call cosine against float (the decoder's: its worst position, what a
  decode step returns; the number ``parity`` reports) meets the target.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, TYPE_CHECKING

import numpy as np

from core.recipes import QuantScheme

if TYPE_CHECKING:  # an annotation only: the model code is not imported for it
    from core.components import Components

Progress = Callable[[str, int, int], None]
MAX_CALLS = 24  # recorded calls replayed per method (decoder: whole prompts, in order)
# what each scheme simulates (the sensitivity report's metric line)
SCHEMES = {
    "w8a8": "output SQNR (dB), int8 per-channel weight + static per-tensor input",
    "w8": "output SQNR (dB), int8 per-channel weight, float input",
    "w8da8": "output SQNR (dB), int8 per-channel weight + dynamic per-row input",
}


def simulates(scheme: QuantScheme) -> bool:
    """Whether the search can simulate ``scheme`` (a target spec's: int8 weights, any input handling)."""
    return scheme.simulation in SCHEMES


def _linears(components: Components) -> dict[str, tuple[str, Any]]:
    """name (as in model.named_modules()) -> (method, nn.Linear), for every method's linears."""
    import torch.nn as nn

    by_id = {id(m): n for n, m in components.model.named_modules()}
    out: dict[str, tuple[str, Any]] = {}
    for method, module in components.methods().items():
        for mod in module.modules():
            if isinstance(mod, nn.Linear) and id(mod) in by_id and by_id[id(mod)] not in out:
                out[by_id[id(mod)]] = (method, mod)
    return out


def _calls(calib: Any, method: str) -> list[dict[str, np.ndarray]]:
    calls = calib.method_inputs.get(method, [])
    if method != "text_decoder":
        return calls[:MAX_CALLS]
    # whole prompts only: stop at the last prompt start that fits
    out: list[dict[str, np.ndarray]] = []
    for c in calls:
        if int(c["cache_position"][0]) == 0 and len(out) >= MAX_CALLS:
            break
        out.append(c)
    return out


def replay(
    components: Components,
    method: str,
    calls: list[dict[str, np.ndarray]],
    keep: bool = True,
    progress: Progress | None = None,
    label: str = "replay",
) -> list[np.ndarray]:
    """Run the method over recorded calls (the decoder's KV cache reset at each prompt start); with ``keep``,
    its output per call as [rows, last dim] (the decoder: [T, vocab] logits). Hooks see every call."""
    import torch

    module = components.methods()[method]
    names = components.input_names(method)
    outs = []
    with torch.no_grad():
        for i, c in enumerate(calls):
            if method == "text_decoder" and int(c["cache_position"][0]) == 0:
                components.text_decoder.cache.reset()
            args = [torch.from_numpy(np.ascontiguousarray(c[n])) for n in names]
            out = module(*args)
            if keep:
                out = out.float()
                outs.append(out.reshape(-1, out.shape[-1]).numpy())
            if progress:
                progress(label, i + 1, len(calls))
    if method == "text_decoder":
        components.text_decoder.cache.reset()
    return outs


def _replay_calls(components: Components, method: str, calls: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """The method's output per recorded call, as [rows, last dim] (the decoder: [T, vocab] logits)."""
    return replay(components, method, calls)


def _replay(components: Components, method: str, calls: list[dict[str, np.ndarray]]) -> np.ndarray:
    outs = _replay_calls(components, method, calls)
    return np.concatenate([o.reshape(-1) for o in outs]) if outs else np.zeros(0, np.float32)


def worst_cosine(method: str, ref: list[np.ndarray], test: list[np.ndarray]) -> float:
    """The cosine ``parity`` reports: the worst call. A decoder prefill row is the logits a decode call
    at that position returns (teacher-forced), so for the decoder it is the worst position."""
    if method == "text_decoder":
        return min(cosine(r, t) for rc, tc in zip(ref, test) for r, t in zip(rc, tc))
    return min(cosine(r.reshape(-1), t.reshape(-1)) for r, t in zip(ref, test))


def _fq_weight(w):
    import torch

    scale = w.abs().amax(dim=tuple(range(1, w.ndim)), keepdim=True).clamp(min=1e-12) / 127.0
    return (torch.clamp(torch.round(w / scale), -127, 127) * scale).to(w.dtype)


def _fq_rows(x):
    """Asymmetric int8 per row (last dim), each row's range its own: XNNPACK's dynamic int8 input."""
    import torch

    lo = x.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = x.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / 255.0).clamp(min=1e-12)
    zero = torch.round(-128 - lo / scale)
    q = torch.clamp(torch.round(x / scale) + zero, -128, 127)
    return ((q - zero) * scale).to(x.dtype)


def _dynamic_pre(_m, args):
    return (_fq_rows(args[0]),) + tuple(args[1:])


@contextlib.contextmanager
def fake_quantized(layers: Iterable[tuple[str, Any]], activation_stats: dict[str, dict[str, Any]], dynamic_inputs: bool = False):
    """Within the block, each (name, nn.Linear) runs with int8-fake-quantized weights and input: static
    per tensor where ``activation_stats`` has the layer, dynamic per row with ``dynamic_inputs``, else float."""
    import torch

    saved, handles = [], []
    try:
        for name, mod in layers:
            saved.append((mod, mod.weight.data))
            mod.weight.data = _fq_weight(mod.weight.data)
            if dynamic_inputs:
                handles.append(mod.register_forward_pre_hook(_dynamic_pre))
                continue
            st = activation_stats.get(name)
            if st is None:
                continue
            scale = max(float(st.get("absmax", max(abs(st["min"]), abs(st["max"])))), 1e-12) / 127.0

            def pre(_m, args, scale=scale):
                x = args[0]
                q = torch.clamp(torch.round(x / scale), -127, 127) * scale
                return (q.to(x.dtype),) + tuple(args[1:])

            handles.append(mod.register_forward_pre_hook(pre))
        yield
    finally:
        for h in handles:
            h.remove()
        for mod, w in saved:
            mod.weight.data = w


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    noise = float(np.sum((ref.astype(np.float64) - test.astype(np.float64)) ** 2))
    signal = float(np.sum(ref.astype(np.float64) ** 2))
    if noise == 0.0:
        return float("inf")
    return 10.0 * float(np.log10(max(signal, 1e-300) / noise))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    d = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / d) if d > 0 else float(np.array_equal(a, b))


def _check_scheme(scheme: QuantScheme | str) -> str:
    """The simulation name of ``scheme`` (a target spec's QuantScheme, or its name)."""
    if isinstance(scheme, QuantScheme):
        scheme = scheme.simulation
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")
    return scheme


def _cache_suffix(scheme: QuantScheme | str) -> str:
    scheme = _check_scheme(scheme)
    return "" if scheme == "w8a8" else f"-{scheme}"  # w8a8 keeps the name it was cached under


def _quantizing(layers: Iterable[tuple[str, Any]], calib: Any, scheme: QuantScheme | str):
    scheme = _check_scheme(scheme)
    # no input range: fake_quantized leaves the input float
    return fake_quantized(layers, calib.activation_stats if scheme == "w8a8" else {}, dynamic_inputs=scheme == "w8da8")


def layer_sensitivity(
    components: Components, calib: Any, progress: Progress | None = None, scheme: QuantScheme | str = "w8a8"
) -> list[tuple[str, float]]:
    """(module name, SQNR dB of its method's output with only that layer int8) for every nn.Linear, worst first."""
    layers = _linears(components)
    refs: dict[str, np.ndarray] = {}
    result: list[tuple[str, float]] = []
    for i, (name, (method, mod)) in enumerate(layers.items()):
        calls = _calls(calib, method)
        if not calls:
            continue
        if method not in refs:
            refs[method] = _replay(components, method, calls)
        with _quantizing([(name, mod)], calib, scheme):
            out = _replay(components, method, calls)
        result.append((name, sqnr_db(refs[method], out)))
        if progress:
            progress("layer sensitivity", i + 1, len(layers))
    result.sort(key=lambda t: t[1])
    return result


def quantized_cosine(
    components: Components, calib: Any, keep_float: Iterable[str] = (), scheme: QuantScheme | str = "w8a8"
) -> dict[str, float]:
    """Per method: worst-call cosine (:func:`worst_cosine`, parity's metric) of the output with every
    nn.Linear not in keep_float int8-fake-quantized, vs float."""
    keep = set(keep_float)
    layers = _linears(components)
    out: dict[str, float] = {}
    for method in components.methods():
        qs = [(n, m) for n, (meth, m) in layers.items() if meth == method and n not in keep]
        calls = _calls(calib, method)
        if not calls or not any(meth == method for meth, _ in layers.values()):
            continue
        ref = _replay_calls(components, method, calls)
        with _quantizing(qs, calib, scheme):
            q = _replay_calls(components, method, calls)
        out[method] = worst_cosine(method, ref, q)
    return out


def choose_keep_float(
    components: Components,
    calib: Any,
    ranking: list[tuple[str, float]],
    target_cos: float,
    progress: Progress | None = None,
    scheme: QuantScheme | str = "w8a8",
) -> tuple[str, ...]:
    """The smallest prefix of ``ranking`` (most sensitive first) kept in float so every method's cosine >= target.

    Keeping more of the ranking in float does not lower the cosine in practice, so the
    prefix length is found by bisection (log2(layers) + 2 evaluations instead of one per
    layer); the returned prefix is checked to meet the target.
    """
    names = [n for n, _ in ranking]

    def meets(k: int) -> bool:
        return all(c >= target_cos for c in quantized_cosine(components, calib, names[:k], scheme).values())

    steps = max(1, int(np.ceil(np.log2(len(names) + 1))) + 2)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress:
            progress("mixed-precision search", min(done, steps), steps)

    tick()
    if meets(0):
        return ()
    lo, hi = 0, len(names)  # meets(lo) is False; meets(hi) is the all-float model
    while hi - lo > 1:
        mid = (lo + hi) // 2
        tick()
        if meets(mid):
            hi = mid
        else:
            lo = mid
    if progress:
        progress("mixed-precision search", steps, steps)
    return tuple(names[:hi])


# --- the one-pass search: every layer quantized, per-layer error attribution -----------------------

SEARCH_PROMPTS = 16  # decoder prompts (whole sequences) the search fits on
HELDOUT_PROMPTS = 8  # and the ones held back to validate its choice
HELDOUT_EVERY = 3  # every third prompt of the calibration set is held back (up to HELDOUT_PROMPTS)


@dataclass
class SearchResult:
    """What :func:`search_keep_float` chose and how it did; ``record()`` goes into artifact.json."""

    keep: tuple[str, ...]
    target: float
    linears: int
    search_cosine: dict[str, float]
    heldout_cosine: dict[str, float]
    passes: int  # forward(+backward) passes over the search set, attribution and bisection together
    wall_s: float = 0.0
    prompts: tuple[int, int] = (0, 0)  # (search, held-out) decoder prompts

    @property
    def met_on_search(self) -> bool:
        return all(c >= self.target for c in self.search_cosine.values())

    @property
    def met_on_heldout(self) -> bool:
        return all(c >= self.target for c in self.heldout_cosine.values())

    def summary(self) -> str:
        """One plain line: what was kept, and whether the target held on the held-back samples."""
        worst = lambda d: min(d.values()) if d else float("nan")  # noqa: E731
        head = (f"--parity-target cos={self.target:g}: {len(self.keep)} of {self.linears} linears kept in float; "
                f"worst cosine {worst(self.search_cosine):.5f} on {self.prompts[0]} search prompts, "
                f"{worst(self.heldout_cosine):.5f} on {self.prompts[1]} held-out prompts")
        if not self.met_on_search:
            return head + " -- TARGET MISSED even with every searched layer in float"
        if not self.met_on_heldout:
            return head + " -- TARGET MISSED on the held-out prompts (met on the search prompts only)"
        return head + " -- target met on both"

    def record(self) -> dict[str, Any]:
        r6 = lambda d: {k: round(v, 6) for k, v in d.items()}  # noqa: E731
        return {"target_cosine": self.target, "kept": len(self.keep), "linears": self.linears,
                "search_cosine": r6(self.search_cosine), "heldout_cosine": r6(self.heldout_cosine),
                "prompts": {"search": self.prompts[0], "heldout": self.prompts[1]},
                "met_on_search": self.met_on_search, "met_on_heldout": self.met_on_heldout,
                "passes": self.passes, "wall_s": round(self.wall_s, 2), "summary": self.summary()}


def _prompts(calls: list[dict[str, np.ndarray]]) -> list[list[dict[str, np.ndarray]]]:
    """Decoder calls grouped into whole prompts (a prompt starts where cache_position does at 0)."""
    out: list[list[dict[str, np.ndarray]]] = []
    for c in calls:
        if int(c["cache_position"][0]) == 0 or not out:
            out.append([])
        out[-1].append(c)
    return out


def split_calls(calib: Any, method: str) -> tuple[list[Any], list[Any]]:
    """(search units, held-out units) of a method: decoder prompts (every HELDOUT_EVERY-th held back), or calls."""
    inputs = calib if isinstance(calib, dict) else calib.method_inputs
    calls = inputs.get(method, [])
    units = _prompts(calls) if method == "text_decoder" else [[c] for c in calls]
    held = [u for i, u in enumerate(units) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1][:HELDOUT_PROMPTS]
    held_ids = {id(u) for u in held}
    search = [u for u in units if id(u) not in held_ids][:SEARCH_PROMPTS if method == "text_decoder" else MAX_CALLS]
    return search, held


def _tensor(a: np.ndarray, grad: bool):
    import torch

    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.requires_grad_(True) if grad and t.is_floating_point() else t


def _unit_output(components: Components, method: str, unit: list[dict[str, np.ndarray]], grad: bool = False):
    """A unit's output rows [rows, last dim] as a torch tensor: a decoder prompt runs as one cache-free
    sequence (forward_full: the same rows the cached calls return); other methods call by call. With
    ``grad`` the float inputs require grad (the weights are frozen meanwhile), so every activation has one."""
    import torch

    if method == "text_decoder":
        embeds = torch.cat([_tensor(c["embeds"], grad) for c in unit], dim=1)
        pos = torch.cat([torch.from_numpy(np.ascontiguousarray(c["position_ids"])) for c in unit], dim=-1)
        text = components.model.text
        out = text.forward_full(embeds.to(components.model.compute_dtype), pos)
        return out.float().reshape(-1, out.shape[-1])
    module, names = components.methods()[method], components.input_names(method)
    outs = [module(*[_tensor(c[n], grad) for n in names]).float() for c in unit]
    return torch.cat([o.reshape(-1, o.shape[-1]) for o in outs])


def _ste(fq):
    """Fake quantization with a straight-through gradient (round() alone has none: nothing upstream would be attributed)."""
    return lambda x: x + (fq(x) - x).detach()


def _input_quantizer(name: str, calib: Any, scheme: str):
    import torch

    if scheme == "w8da8":
        return _fq_rows
    if scheme != "w8a8":
        return None
    st = calib.activation_stats.get(name)
    if st is None:
        return None
    absmax = st["absmax"] if "absmax" in st else max(abs(st["min"]), abs(st["max"]))
    scale = max(float(absmax), 1e-12) / 127.0
    return lambda x: (torch.clamp(torch.round(x / scale), -127, 127) * scale).to(x.dtype)


@contextlib.contextmanager
def _attributing(layers: list[tuple[str, Any]], calib: Any, scheme: str, record: bool):
    """Every (name, linear) int8-fake-quantized (straight-through); with ``record``, each layer's own output
    error delta = y_q - W x (the float layer on the same, already perturbed, input) and its output kept for
    its gradient. Yields the dict name -> [(output, delta), ...]."""
    import torch
    import torch.nn.functional as F

    seen: dict[str, list[tuple[Any, Any]]] = {}
    saved, handles = [], []
    try:
        for name, mod in layers:
            w = mod.weight.data
            saved.append((mod, w))
            mod.weight.data = _fq_weight(w)
            q = _input_quantizer(name, calib, scheme)
            q = _ste(q) if q is not None else (lambda x: x)

            def pre(m, args, q=q):
                x = args[0]
                if record and torch.is_grad_enabled() and not x.requires_grad and x.is_floating_point():
                    x = x.detach().requires_grad_(True)  # an input from integers only (token ids): a leaf here
                m._raw_input = x
                return (q(x),) + tuple(args[1:])

            def post(m, _args, out, name=name, w=w):
                if record and out.requires_grad:
                    delta = (out - F.linear(m._raw_input, w, m.bias)).detach()
                    out.retain_grad()
                    seen.setdefault(name, []).append((out, delta))
                m._raw_input = None
                return out

            handles.append(mod.register_forward_pre_hook(pre))
            handles.append(mod.register_forward_hook(post))
        yield seen
    finally:
        for h in handles:
            h.remove()
        for mod, w in saved:
            mod.weight.data = w
            mod._raw_input = None


def _row_cosines(ref, test):
    import torch

    return torch.nn.functional.cosine_similarity(test.double(), ref.double(), dim=-1, eps=1e-30)


def _worst(method: str, cosines: list[Any]) -> float:
    """parity's metric from per-row cosines: the decoder's worst position, other methods' worst call."""
    return float(min(c.min() for c in cosines)) if cosines else 1.0


def evaluate(components: Components, calib: Any, method: str, units: list[Any], keep: Iterable[str], scheme: str,
             refs: list[Any] | None = None) -> float:
    """Worst cosine (parity's metric) of ``method`` over ``units`` with every linear not in ``keep`` int8."""
    import torch

    keep = set(keep)
    layers = [(n, m) for n, (meth, m) in _linears(components).items() if meth == method and n not in keep]
    cos = []
    with torch.no_grad():
        for i, unit in enumerate(units):
            ref = refs[i] if refs is not None else _unit_output(components, method, unit)
            with _attributing(layers, calib, scheme, record=False):
                test = _unit_output(components, method, unit)
            if method == "text_decoder":
                cos.append(_row_cosines(ref, test))
            else:  # a whole call, as parity compares it
                cos.append(_row_cosines(ref.reshape(1, -1), test.reshape(1, -1)))
    return _worst(method, cos)


def attribute(components: Components, calib: Any, method: str, units: list[Any], keep: Iterable[str], scheme: str,
              refs: list[Any]) -> tuple[float, dict[str, float]]:
    """One forward + backward pass with every linear not in ``keep`` int8: (worst cosine, per-layer attribution).

    The loss is sum over rows of (1 - cosine)^2 against float (worst rows weigh most). A layer's attribution is
    <dLoss/dy, delta>: to first order, how much of the loss its own quantization error explains (the
    attributions sum to the loss's first-order change from float), the loss it would remove in float.
    """
    keep = set(keep)
    layers = [(n, m) for n, (meth, m) in _linears(components).items() if meth == method and n not in keep]
    score = {n: 0.0 for n, _ in layers}
    cos = []
    with _frozen(components.model):
        for ref, unit in zip(refs, units):
            cos.append(_attribute_unit(components, method, unit, ref, layers, calib, scheme, score))
    return _worst(method, cos), score


@contextlib.contextmanager
def _frozen(model):
    """No parameter gradients (only activations' are read): saves a weight-sized buffer per parameter."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def _attribute_unit(components, method, unit, ref, layers, calib, scheme, score):
    """One unit's forward + backward; adds each layer's <dLoss/dy, delta> to ``score``; returns its row cosines."""
    with _attributing(layers, calib, scheme, record=True) as seen:
        test = _unit_output(components, method, unit, grad=True)
        if method == "text_decoder":
            c = _row_cosines(ref, test)
        else:
            c = _row_cosines(ref.reshape(1, -1), test.reshape(1, -1))
        ((1 - c) ** 2).sum().backward()
        for name, pairs in seen.items():
            score[name] += float(sum((out.grad.double() * delta.double()).sum() for out, delta in pairs if out.grad is not None))
    return c.detach()


def _chunk(score: dict[str, float], total_linears: int) -> list[str]:
    """The layers to move to float next: the fewest that explain half the positive attribution, 1 to 10% of all."""
    ranked = sorted(((v, n) for n, v in score.items() if v > 0), reverse=True)
    if not ranked:
        ranked = sorted(((v, n) for n, v in score.items()), reverse=True)
    total = sum(v for v, _ in ranked if v > 0)
    out, acc = [], 0.0
    cap = max(4, int(np.ceil(0.1 * total_linears)))
    for v, n in ranked:
        out.append(n)
        acc += max(v, 0.0)
        if acc >= 0.5 * total or len(out) >= cap:
            break
    return out


def search_keep_float(
    components: Components,
    calib: Any,
    target_cos: float,
    progress: Progress | None = None,
    scheme: QuantScheme | str = "w8a8",
) -> SearchResult:
    """The keep-float set for ``target_cos``: attribution-ordered, fitted on the search prompts, checked on held-out.

    Instead of one replay per layer (``layer_sensitivity``: 181 replays on SmolLM2), each round is one pass
    with every remaining layer int8 and a backward pass that attributes the output error to the layers
    (:func:`attribute`); the layers explaining half of it go to float, and the round repeats at the new point
    until the target holds on the search prompts. The order they went in is then cut to its shortest
    prefix that meets the target (bisection, as :func:`choose_keep_float`), and that set is measured on
    prompts held back from all of it. The result says when the target was missed, and where.
    """
    import time


    import torch

    scheme = _check_scheme(scheme)
    t0 = time.perf_counter()
    layers = _linears(components)
    passes = 0
    order: list[str] = []
    search_cos: dict[str, float] = {}
    held_cos: dict[str, float] = {}
    n_prompts = (0, 0)
    for method in components.methods():
        if not any(meth == method for meth, _ in layers.values()):
            continue
        search, held = split_calls(calib, method)
        if not search:
            continue
        if method == "text_decoder":
            n_prompts = (len(search), len(held))
        mine = [n for n, (meth, _) in layers.items() if meth == method]
        with torch.no_grad():
            refs = [_unit_output(components, method, u) for u in search]
        keep: list[str] = []
        rounds = 0
        while True:
            cos, score = attribute(components, calib, method, search, keep, scheme, refs)
            passes += 1
            rounds += 1
            if progress:
                progress(f"keep-float search ({method})", len(keep), len(mine))
            if cos >= target_cos or len(keep) == len(mine):
                break
            keep += _chunk(score, len(mine))
        # shortest prefix of the order that meets the target (more float never hurts in practice)
        if cos >= target_cos and keep:
            lo, hi = 0, len(keep)  # the first round found no float layers too few
            while hi - lo > 1:
                mid = (lo + hi) // 2
                passes += 1
                if evaluate(components, calib, method, search, keep[:mid], scheme, refs) >= target_cos:
                    hi = mid
                else:
                    lo = mid
            keep = keep[:hi]
        search_cos[method] = evaluate(components, calib, method, search, keep, scheme, refs) if keep else cos
        if held:
            held_cos[method] = evaluate(components, calib, method, held, keep, scheme)
        order += keep
    if components.text_decoder is not None:
        components.text_decoder.cache.reset()
    return SearchResult(tuple(order), target_cos, len(layers), search_cos, held_cos, passes,
                        time.perf_counter() - t0, n_prompts)


SENSITIVITY_VERSION = 1


def cached_layer_sensitivity(
    components: Components, calib: Any, cache_dir: Path | None = None, progress: Progress | None = None, scheme: QuantScheme | str = "w8a8"
):
    """``layer_sensitivity``, cached beside the calibration cache by the calibration key (and the scheme).

    The key already covers the weights, the calibration manifest and the preprocessing
    version, so every export with ``--parity-target`` on the same model and set reuses
    one ranking.
    """
    from calibration.stats import default_cache_dir

    key = getattr(calib, "key", None)
    if not key:
        return layer_sensitivity(components, calib, progress, scheme)
    path = Path(cache_dir or default_cache_dir()) / f"sensitivity-{SENSITIVITY_VERSION}{_cache_suffix(scheme)}-{key[:32]}.json"
    if path.is_file():
        try:
            return [(n, float(s)) for n, s in json.loads(path.read_text())["ranking"]]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged cache entry is recomputed
    ranking = layer_sensitivity(components, calib, progress, scheme)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".sensitivity.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump({"key": key, "ranking": [[n, s if s != float("inf") else 1e9] for n, s in ranking]}, f)
    os.replace(tmp, path)
    return ranking


def parse_parity_target(spec: str) -> float:
    """``cos=0.999`` -> 0.999 (BadInputError otherwise)."""
    from core.errors import BadInputError

    key, sep, value = spec.partition("=")
    try:
        v = float(value)
    except ValueError:
        v = float("nan")
    if not sep or key.strip() not in ("cos", "cosine") or not (0.0 < v <= 1.0):
        raise BadInputError(f"--parity-target '{spec}': expected cos=NUMBER with 0 < NUMBER <= 1, e.g. cos=0.999")
    return v


def write_sensitivity_report(ranking: list[tuple[str, float]], out_dir: Path, scheme: QuantScheme | str = "w8a8") -> list[str]:
    """``out_dir/sensitivity.json`` and ``out_dir/sensitivity.txt`` (ranked, worst first); returns summary lines."""
    scheme = _check_scheme(scheme)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [
        {"rank": i + 1, "module": n, "sqnr_db": None if s == float("inf") else round(s, 3)}
        for i, (n, s) in enumerate(ranking)
    ]
    def fmt(v):
        return "inf" if v is None else f"{v:.2f}"

    text = ["rank  sqnr_db  module"] + [f"{r['rank']:>4}  {fmt(r['sqnr_db']):>7}  {r['module']}" for r in rows]
    for name, body in (
        ("sensitivity.json", json.dumps({"scheme": scheme, "metric": SCHEMES[scheme], "layers": rows}, indent=1)),
        ("sensitivity.txt", "\n".join(text) + "\n"),
    ):
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(body)
        os.replace(tmp, out_dir / name)
    lines = [f"sensitivity: {out_dir / 'sensitivity.json'} ({len(rows)} layers; most sensitive first)"]
    lines += ["  " + t for t in text[1:6]]
    return lines
