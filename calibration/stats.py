"""Run the reference model over real samples once and keep what every target needs.

``collect_method_inputs`` drives the eager reference through the shared
runner (so preprocessing and prompt layout are exactly those used at parity
time) and records each method's inputs in call order. For the decoder it
also records the KV cache content before each call ("past"), which
explicit-past backends (ONNX Runtime) need to replay a call on its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, TYPE_CHECKING

import numpy as np

from core.errors import BadInputError
from core.runner import EagerSession, Prompt, Runner

if TYPE_CHECKING:  # an annotation only: the model code is not imported for it
    from core.components import Components

MethodInputs = dict[str, list[dict[str, Any]]]


class RecordingSession(EagerSession):
    """An EagerSession that keeps a copy of every call's inputs."""

    def __init__(self, components: Components, record_past: bool = True):
        super().__init__(components)
        self.calls: MethodInputs = {m: [] for m in self.modules}
        self.record_past = record_past

    def run(self, method: str, **inputs: np.ndarray) -> np.ndarray:
        rec = {k: np.array(v, copy=True) for k, v in inputs.items()}
        if method == "text_decoder" and self.record_past:
            cache = self.components.text_decoder.cache
            p = int(inputs["cache_position"][0])
            rec["past"] = [
                (getattr(cache, f"k_{i}")[:, :, :p].numpy().copy(), getattr(cache, f"v_{i}")[:, :, :p].numpy().copy())
                for i in range(cache.num_layers)
            ]
        self.calls[method].append(rec)
        return super().run(method, **inputs)


def collect_method_inputs(
    components: Components,
    prompts: Iterable[Prompt],
    tokenizer: Any,
    decode_steps: int = 4,
    record_past: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
) -> MethodInputs:
    """Each method's inputs, in call order, from running the reference over ``prompts``.

    Every prompt is prefilled segment by segment and then decoded greedily for
    ``decode_steps`` tokens, so decoder samples cover both prefill (T > 1) and
    decode (T = 1) calls.
    """
    cfg = components.config
    # a text-only model (e.g. smollm2-135m) calibrates on the text of media samples
    prompts = [
        dataclasses.replace(p, image=p.image if cfg.vision else None, audio=p.audio if cfg.audio else None) for p in prompts
    ]
    session = RecordingSession(components, record_past=record_past)
    runner = Runner(session, components.config, tokenizer)
    for i, prompt in enumerate(prompts):
        runner.generate(prompt, max_new_tokens=decode_steps, stop_at_eos=False)
        if progress:
            progress("calibration samples", i + 1, len(prompts))
    return session.calls


# --- calibrate: one reference run, cached ---------------------------------------------


CACHE_SCHEMA = 1
PERCENTILES = (0.01, 0.1, 1.0, 99.0, 99.9, 99.99)
HIST_BINS = 256
_RESERVOIR = 200_000  # values kept per module for percentiles / histogram (min/max are exact)


@dataclass
class CalibrationData:
    """What one reference run over a calibration set gives every target.

    method_inputs: ``collect_method_inputs``'s dict (per method, inputs in call order).
    activation_stats: per module name (as in ``model.named_modules()``), statistics of
      that nn.Linear / Conv's *input* activation: min, max, absmax, p<q> percentiles,
      hist {edges, counts} (percentiles and histogram from a deterministic subsample
      of at most 200k values; min/max exact), calls, numel.
    key: the cache key (sha256 of weights hash + manifest hash + PREPROCESS_VERSION).
    manifest: the manifest the samples came from.
    """

    method_inputs: MethodInputs
    activation_stats: dict[str, dict[str, Any]]
    key: str
    manifest: Path | None = None
    from_cache: bool = field(default=False, compare=False)


def default_cache_dir() -> Path:
    env = os.environ.get("AUTOGLM_EXPORT_CACHE")
    base = Path(env) if env else Path.home() / ".cache" / "autoglm-export"
    return base / "calibration"


def weights_hash(model: Any) -> str:
    """sha256 over every parameter and buffer of the model (names, dtypes, shapes, bytes)."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def calibration_key(components: Components, manifest: Path, decode_steps: int) -> str:
    from calibration.manifest import manifest_hash
    from core.preprocess import PREPROCESS_VERSION

    parts = [
        f"schema={CACHE_SCHEMA}",
        f"weights={weights_hash(components.model)}",
        f"manifest={manifest_hash(manifest)}",
        f"preprocess={PREPROCESS_VERSION}",
        f"decode_steps={decode_steps}",
        f"max_seq={components.text_decoder.cache.max_seq_len if hasattr(components.text_decoder.cache, 'max_seq_len') else ''}",
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


class _ActivationObserver:
    """Forward pre-hooks on every nn.Linear / Conv: exact min/max and a subsample of values."""

    def __init__(self, model: Any):
        import torch.nn as nn

        self.stats: dict[str, dict[str, Any]] = {}
        self.samples: dict[str, list[np.ndarray]] = {}
        self.kept: dict[str, int] = {}
        self.rng = np.random.default_rng(0)
        self.handles = []
        for name, mod in model.named_modules():
            if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                self.handles.append(mod.register_forward_pre_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(_mod, args):
            x = args[0].detach().float().reshape(-1).numpy()
            if x.size == 0:
                return
            s = self.stats.setdefault(name, {"min": float("inf"), "max": float("-inf"), "calls": 0, "numel": 0})
            s["min"] = min(s["min"], float(x.min()))
            s["max"] = max(s["max"], float(x.max()))
            s["calls"] += 1
            s["numel"] += int(x.size)
            room = _RESERVOIR - self.kept.get(name, 0)
            if room > 0:
                take = x if x.size <= min(room, 20_000) else x[self.rng.choice(x.size, min(room, 20_000), replace=False)]
                self.samples.setdefault(name, []).append(take.astype(np.float32))
                self.kept[name] = self.kept.get(name, 0) + take.size

        return hook

    def close(self) -> dict[str, dict[str, Any]]:
        for h in self.handles:
            h.remove()
        out = {}
        for name, s in self.stats.items():
            v = np.concatenate(self.samples.get(name, [np.zeros(1, np.float32)]))
            s = dict(s)
            s["absmax"] = max(abs(s["min"]), abs(s["max"]))
            for q in PERCENTILES:
                s[f"p{q:g}"] = float(np.percentile(v, q))
            lo, hi = s["min"], s["max"]
            if hi <= lo:
                hi = lo + 1e-6
            counts, edges = np.histogram(v, bins=HIST_BINS, range=(lo, hi))
            s["hist"] = {"edges": edges.astype(float).tolist(), "counts": counts.astype(int).tolist()}
            out[name] = s
        return out


def _flatten(method_inputs: MethodInputs) -> dict[str, np.ndarray]:
    flat: dict[str, np.ndarray] = {}
    for method, calls in method_inputs.items():
        for i, call in enumerate(calls):
            for name, v in call.items():
                if name == "past":
                    for layer, (k, vv) in enumerate(v):
                        flat[f"{method}/{i}/past/{layer}/k"] = k
                        flat[f"{method}/{i}/past/{layer}/v"] = vv
                else:
                    flat[f"{method}/{i}/{name}"] = v
    return flat


def _unflatten(flat: dict[str, np.ndarray], counts: dict[str, int]) -> MethodInputs:
    out: MethodInputs = {m: [{} for _ in range(n)] for m, n in counts.items()}
    pasts: dict[tuple[str, int], dict[int, dict[str, np.ndarray]]] = {}
    for key, v in flat.items():
        parts = key.split("/")
        method, i = parts[0], int(parts[1])
        if parts[2] == "past":
            pasts.setdefault((method, i), {}).setdefault(int(parts[3]), {})[parts[4]] = v
        else:
            out[method][i][parts[2]] = v
    for (method, i), layers in pasts.items():
        out[method][i]["past"] = [(layers[n]["k"], layers[n]["v"]) for n in sorted(layers)]
    for method, calls in out.items():  # a decoder call at position 0 has an empty past
        for call in calls:
            if method == "text_decoder" and "past" not in call and "cache_position" in call:
                call["past"] = []
    return out


def save_calibration(data: CalibrationData, out: Path) -> list[str]:
    """Write ``out/method_inputs.npz`` + ``out/calibration.json`` (atomically); return summary lines."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counts = {m: len(c) for m, c in data.method_inputs.items()}
    has_past = {m: any("past" in c for c in calls) for m, calls in data.method_inputs.items()}
    meta = {
        "schema": CACHE_SCHEMA,
        "key": data.key,
        "manifest": str(data.manifest) if data.manifest else None,
        "calls": counts,
        "has_past": has_past,
        "activation_stats": data.activation_stats,
    }
    for name, payload in (("method_inputs.npz", None), ("calibration.json", meta)):
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.", suffix=".tmp")
        os.close(fd)
        try:
            if payload is None:
                with open(tmp, "wb") as f:
                    np.savez(f, **_flatten(data.method_inputs))
            else:
                Path(tmp).write_text(json.dumps(payload, indent=1))
            os.replace(tmp, out / name)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    calls = ", ".join(f"{m} {n}" for m, n in counts.items())
    return [
        f"calibration: {out} (key {data.key}{', from cache' if data.from_cache else ''})",
        f"  samples per method: {calls}; activation statistics for {len(data.activation_stats)} modules",
    ]


def load_calibration(path: Path) -> CalibrationData:
    """Read what :func:`save_calibration` (``autoglm-export calibrate --out DIR``) wrote."""
    from core.errors import InputFileError

    path = Path(path)
    meta_file, npz_file = path / "calibration.json", path / "method_inputs.npz"
    if not meta_file.is_file() or not npz_file.is_file():
        raise InputFileError(f"{path}: not a calibration directory (needs calibration.json and method_inputs.npz)")
    try:
        meta = json.loads(meta_file.read_text())
        with np.load(npz_file, allow_pickle=False) as z:
            flat = {k: z[k] for k in z.files}
    except Exception as e:  # json / zip errors
        raise InputFileError(f"{path}: corrupt calibration data: {e}") from e
    if meta.get("schema") != CACHE_SCHEMA:
        raise InputFileError(f"{meta_file}: calibration schema {meta.get('schema')}, expected {CACHE_SCHEMA}")
    inputs = _unflatten(flat, meta["calls"])
    for m, hp in meta.get("has_past", {}).items():
        if not hp:
            for call in inputs[m]:
                call.pop("past", None)
    return CalibrationData(
        method_inputs=inputs,
        activation_stats=meta["activation_stats"],
        key=meta["key"],
        manifest=Path(meta["manifest"]) if meta.get("manifest") else None,
    )


def check_compatible(data: CalibrationData, components: Components, where: Path) -> None:
    """A calibration result must come from a model of this one's shape: same linears, same widths.

    Statistics of other layers (a --layers cut, another model) would leave this model's layers without
    ranges and fail deep inside a quantizer; this says so up front, naming the first difference.
    """
    from torch import nn

    from core.errors import InputFileError

    linears = {n for n, m in components.model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))}
    have = set(data.activation_stats)
    missing, extra = sorted(linears - have), sorted(have - linears)
    if missing or extra:
        first = f"no statistics for {missing[0]}" if missing else f"statistics for {extra[0]}, which this model lacks"
        raise InputFileError(
            f"--calibration {where}: made for another model ({first}; {len(missing)} layers missing, {len(extra)} "
            f"unknown); run `autoglm-export calibrate` with the same --preset/--checkpoint/--layers"
        )
    h = components.config.text.hidden_size
    for call in data.method_inputs.get("text_decoder", [])[:1]:
        embeds = call.get("embeds")
        if embeds is not None and embeds.shape[-1] != h:
            raise InputFileError(f"--calibration {where}: decoder inputs are {embeds.shape[-1]} wide, this model's are {h}")


def calibrate(
    components: Components,
    manifest: Path | None,
    tokenizer: Any,
    cache_dir: Path | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    decode_steps: int = 4,
) -> CalibrationData:
    """Run the reference over ``manifest`` (default: the built-in set) once; cache the result.

    The cache entry ``cache_dir/<key>/`` is keyed by the model's weights, the
    manifest and every file it references, and PREPROCESS_VERSION; a second
    call with the same inputs reads it instead of running the model.
    """
    from core.dataset import calibration_manifest
    from calibration.manifest import read_manifest

    manifest = Path(manifest) if manifest else calibration_manifest()
    samples = read_manifest(manifest)  # every bad line reported before any model work
    key = calibration_key(components, manifest, decode_steps)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    entry = cache / key
    if (entry / "calibration.json").is_file():
        try:
            data = load_calibration(entry)
            data.from_cache = True
            data.manifest = manifest
            if progress:
                progress("calibration (cached)", len(samples), len(samples))
            return data
        except Exception:  # a damaged cache entry is recomputed
            pass
    observer = _ActivationObserver(components.model)
    try:
        inputs = collect_method_inputs(
            components, [s.to_prompt() for s in samples], tokenizer, decode_steps=decode_steps, progress=progress
        )
    finally:
        act = observer.close()
        components.text_decoder.cache.reset()
    data = CalibrationData(method_inputs=inputs, activation_stats=act, key=key, manifest=manifest)
    try:
        save_calibration(data, entry)
    except OSError:  # an unwritable cache only costs the next run time
        pass
    return data


# --- what a target's int8-static export is handed -------------------------------------


def spread(items: list[Any], n: int) -> list[Any]:
    """At most ``n`` items spread evenly over the list (keeps prefill and decode calls of every prompt)."""
    if len(items) <= n:
        return list(items)
    idx = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in sorted(set(idx.tolist()))]


def record_builtin_inputs(components: Components, progress: Callable[[str, int, int], None] | None = None, limit: int | None = None):
    """Run the shipped calibration manifest through the reference runner and record each method's inputs."""
    from core.dataset import calibration_manifest
    from calibration.manifest import read_manifest
    from core.runner import load_tokenizer

    prompts = [s.to_prompt() for s in read_manifest(calibration_manifest())]
    if limit:
        prompts = spread(prompts, limit)
    return collect_method_inputs(components, prompts, load_tokenizer(components.config), progress=progress)


def resolve_method_inputs(calibration: Any, components: Components, progress: Callable[[str, int, int], None] | None = None) -> MethodInputs:
    """Per-method recorded runner inputs from whatever the pipeline handed a target.

    A dict (``collect_method_inputs``), a ``CalibrationData`` (``.method_inputs``),
    or None: then the built-in calibration set is run through the reference
    runner (real photos, recordings and prompts). Never random tensors.
    """
    if isinstance(calibration, dict):
        return calibration
    value = getattr(calibration, "method_inputs", None)
    if isinstance(value, dict):
        return value
    if calibration is not None:
        raise BadInputError(f"int8-static calibration data of type {type(calibration).__name__} has no per-method inputs")
    return record_builtin_inputs(components, progress)
