"""The build: a config (TOML) -> every target x recipe artifact, parity of each -> manifest.json.

Config schema (every key optional; no file = :data:`DEFAULT_CONFIG`)::

    [model]
    preset = "tiny"            # or checkpoint = "/path/to/AutoGLM-Phone-9B"
    layers = 2                 # presets only: cut the decoder to N layers

    [calibration]
    manifest = "calib.jsonl"   # default: the built-in calibration set

    [parity]
    steps = 32
    inputs = "heldout.jsonl"   # default: the built-in held-out set
    thresholds = { "*.cosine" = 0.97 }          # every artifact
    [parity.recipe.int8-static]                 # one recipe
    "decoder.top1_agreement" = 0.5

    [[artifact]]
    target = "executorch"
    recipe = "int8-static"
    keep_float = []            # module names left in float
    group_size = 32            # grouped recipes (default 32); int8-weight on ort: blocks instead of per channel
    parity_target = "cos=0.999"  # keep the most sensitive layers float until this holds (int8 recipes)
    prune_heads = 0.25         # remove this fraction of attention heads (calibrated importance)
    skip_layers = 2            # remove this many decoder layers (calibrated block influence)
    check_floor = 0.8          # the export check's cosine floor instead of the recipe's gate (accepted drift)
    smooth = 0.5               # SmoothQuant migration strength (export --smooth)
    gptq = true                # GPTQ rounding onto the recipe's weight grid (export --gptq; false: --no-gptq;
                               # absent: the recipe's default on that target)
    activation_range = "minmax"  # int8-static: how activation ranges are set (export --activation-range)
    thresholds = { "text_decoder.cosine" = 0.98 }  # this artifact only
    name = "executorch-int8-static"                # directory name (default target-recipe)

Each artifact is exported by :func:`exporter.export.export_model`, the function the ``export`` command
uses, so an entry takes the same options. Relative paths are relative to the config file. Output: ``OUT/<name>/`` per
artifact (with ``parity/`` reports inside) and ``OUT/manifest.json``.

Atomicity: each artifact is exported and checked inside ``OUT/.staging-<name>-*``
and renamed into place only when complete; manifest.json is rewritten
atomically after each artifact. A killed build leaves complete artifacts and
hidden staging dirs, which the next build removes. Re-running skips every
artifact whose export key (config entry, model source, calibration inputs,
package and runtime versions) is unchanged and whose files still hash to what
the manifest says; when only the parity inputs changed (thresholds, steps,
held-out set) parity is re-run on the intact artifact without re-exporting.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading
import time
import tomllib
from pathlib import Path
from typing import Any, Callable

from core.errors import ConfigError, OutputError, ParityFailure
from core.recipes import DEFAULT_GROUP_SIZE, GROUPED_RECIPES

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA = "autoglm-export/build-manifest"
MANIFEST_SCHEMA_VERSION = 1
STAGING_PREFIX = ".staging-"

Progress = Callable[[str, int, int], None]

DEFAULT_CONFIG_TOML = """\
# The embedded default build: the tiny preset on every target this build ships, a float and an
# int8-static recipe each.
[model]
preset = "tiny"

[parity]
steps = 32

[[artifact]]
target = "executorch"
recipe = "fp32"

[[artifact]]
target = "executorch"
recipe = "int8-static"

[[artifact]]
target = "ort"
recipe = "fp32"

[[artifact]]
target = "ort"
recipe = "int8-static"

[[artifact]]
target = "coreml"
recipe = "fp16"

[[artifact]]
target = "coreml"
recipe = "int8-static"
"""

_TOP_KEYS = {"model", "calibration", "parity", "artifact"}
_MODEL_KEYS = {"preset", "checkpoint", "layers"}
_ARTIFACT_KEYS = {"target", "recipe", "keep_float", "group_size", "thresholds", "name", "parity_target", "prune_heads",
                  "skip_layers", "check_floor", "smooth", "gptq", "activation_range"}
_EXPORT_KEYS = ("target", "recipe", "keep_float", "group_size", "parity_target", "prune_heads", "skip_layers", "check_floor",
                "smooth", "gptq", "activation_range")
# keys that enter an artifact's export key only when set, so that builds made before they existed keep their keys
_OPTIONAL_EXPORT_KEYS = {"check_floor": None, "smooth": None, "gptq": None, "activation_range": None}
_PARITY_KEYS = {"steps", "inputs", "thresholds", "recipe"}


# --- config --------------------------------------------------------------------------------


def config_text(path: Path | None) -> str:
    """The config's TOML text (the embedded default when ``path`` is None)."""
    if path is None:
        return DEFAULT_CONFIG_TOML
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"build config {path}: file not found") from None
    except OSError as e:
        raise ConfigError(f"build config {path}: unreadable: {e.strerror or e}") from None


def load_config(path: Path | None) -> dict[str, Any]:
    """Parse and validate a build config; returns a normalised dict (paths resolved)."""
    if path is None:
        raw = tomllib.loads(DEFAULT_CONFIG_TOML)
        base = Path.cwd()
        where = "embedded default config"
    else:
        path = Path(path)
        try:
            raw = tomllib.loads(config_text(path))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"build config {path}: not valid TOML: {e}") from None
        base = path.resolve().parent
        where = str(path)
    return _normalise(raw, base, where)


def _normalise(raw: dict[str, Any], base: Path, where: str) -> dict[str, Any]:
    from core.recipes import ALL_RECIPES

    from exporter import parity

    def bad(msg: str) -> ConfigError:
        return ConfigError(f"{where}: {msg}")

    def unknown(section: str, d: dict, allowed: set) -> None:
        extra = sorted(set(d) - allowed)
        if extra:
            raise bad(f"[{section}] unknown key(s) {', '.join(extra)}; allowed: {', '.join(sorted(allowed))}")

    unknown("top level", raw, _TOP_KEYS)
    model = dict(raw.get("model", {}))
    unknown("model", model, _MODEL_KEYS)
    if model.get("checkpoint") and model.get("preset"):
        raise bad("[model] give either preset or checkpoint, not both")
    if model.get("checkpoint"):
        model["checkpoint"] = str(_resolve(base, model["checkpoint"]))
        model.setdefault("preset", None)
    else:
        model.setdefault("preset", "tiny")
        model["checkpoint"] = None
    layers = model.get("layers")
    if layers is not None and (not isinstance(layers, int) or layers < 1):
        raise bad(f"[model] layers = {layers!r}: must be a positive integer")
    model.setdefault("layers", None)

    calib = dict(raw.get("calibration", {}))
    unknown("calibration", calib, {"manifest"})
    calib["manifest"] = str(_resolve(base, calib["manifest"])) if calib.get("manifest") else None

    par = dict(raw.get("parity", {}))
    unknown("parity", par, _PARITY_KEYS)
    steps = par.get("steps", 32)
    if not isinstance(steps, int) or steps < 1:
        raise bad(f"[parity] steps = {steps!r}: must be a positive integer")
    thresholds = _thresholds(par.get("thresholds", {}), "[parity] thresholds", bad)
    per_recipe = {}
    for rname, t in dict(par.get("recipe", {})).items():
        if rname not in ALL_RECIPES:
            raise bad(f"[parity.recipe.{rname}]: unknown recipe; known: {', '.join(ALL_RECIPES)}")
        per_recipe[rname] = _thresholds(t, f"[parity.recipe.{rname}]", bad)
    parity_cfg = {
        "steps": steps,
        "inputs": str(_resolve(base, par["inputs"])) if par.get("inputs") else None,
        "thresholds": thresholds,
        "recipe": per_recipe,
    }

    arts = raw.get("artifact", [])
    if not isinstance(arts, list) or not arts:
        raise bad("no [[artifact]] entries; add at least one with target and recipe")
    out_arts, names = [], set()
    for i, a in enumerate(arts, 1):
        unknown(f"artifact #{i}", a, _ARTIFACT_KEYS)
        if "target" not in a or "recipe" not in a:
            raise bad(f"[[artifact]] #{i}: needs both target and recipe")
        kf = a.get("keep_float", [])
        if not isinstance(kf, list) or not all(isinstance(x, str) for x in kf):
            raise bad(f"[[artifact]] #{i}: keep_float must be a list of module names")
        gs = a.get("group_size", DEFAULT_GROUP_SIZE if a["recipe"] in GROUPED_RECIPES else None)
        if gs is not None and (isinstance(gs, bool) or not isinstance(gs, int) or gs < 0):
            raise bad(f"[[artifact]] #{i}: group_size must be a non-negative integer")
        pt = a.get("parity_target")
        if pt is not None and not isinstance(pt, str):
            raise bad(f"[[artifact]] #{i}: parity_target must be a string such as \"cos=0.999\"")
        ph = a.get("prune_heads")
        if ph is not None and (isinstance(ph, bool) or not isinstance(ph, (int, float))):
            raise bad(f"[[artifact]] #{i}: prune_heads must be a number (the fraction of heads to remove)")
        sl = a.get("skip_layers")
        if sl is not None and (isinstance(sl, bool) or not isinstance(sl, int)):
            raise bad(f"[[artifact]] #{i}: skip_layers must be an integer (decoder layers to remove)")
        cf = a.get("check_floor")
        if cf is not None and (isinstance(cf, bool) or not isinstance(cf, (int, float))):
            raise bad(f"[[artifact]] #{i}: check_floor must be a number (the export check's cosine floor)")
        sm = a.get("smooth")
        if sm is not None and (isinstance(sm, bool) or not isinstance(sm, (int, float))):
            raise bad(f"[[artifact]] #{i}: smooth must be a number (SmoothQuant's migration strength, e.g. 0.5)")
        gq = a.get("gptq")
        if gq is not None and not isinstance(gq, bool):
            raise bad(f"[[artifact]] #{i}: gptq must be true or false")
        ar = a.get("activation_range")
        if ar is not None and not isinstance(ar, str):
            raise bad(f"[[artifact]] #{i}: activation_range must be a string such as \"minmax\"")
        name = a.get("name") or f"{a['target']}-{a['recipe']}"
        if name in names:
            raise bad(f"[[artifact]] #{i}: duplicate artifact name '{name}' (set name = ... to tell them apart)")
        if name.startswith(".") or "/" in name or name == MANIFEST_NAME:
            raise bad(f"[[artifact]] #{i}: bad artifact name '{name}'")
        names.add(name)
        art_t = _thresholds(a.get("thresholds", {}), f"[[artifact]] #{i} thresholds", bad)
        merged = {**thresholds, **per_recipe.get(a["recipe"], {}), **art_t}
        parity.thresholds_for(a["recipe"], merged)  # validates every key
        out_arts.append(
            {
                "name": name,
                "target": str(a["target"]),
                "recipe": str(a["recipe"]),
                "keep_float": list(kf),
                "group_size": gs,
                "parity_target": pt,
                "prune_heads": None if ph is None else float(ph),
                "skip_layers": sl,
                "check_floor": None if cf is None else float(cf),
                "smooth": None if sm is None else float(sm),
                "gptq": gq,
                "activation_range": ar,
                "thresholds": merged,
            }
        )
    return {"model": model, "calibration": calib, "parity": parity_cfg, "artifacts": out_arts}


def _thresholds(d: Any, where: str, bad) -> dict[str, float]:
    if not isinstance(d, dict):
        raise bad(f"{where}: expected a table of METHOD.METRIC = NUMBER")
    out = {}
    for k, v in d.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad(f"{where}: '{k}' = {v!r} is not a number")
        out[str(k)] = float(v)
    return out


def _resolve(base: Path, p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else (base / q).resolve()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _sha(obj: Any) -> str:
    return hashlib.sha256(_canonical(obj)).hexdigest()


def code_digest() -> str:
    """sha256 over this package's own source (core/, exporter/, targets/, calibration/, cli.py): an artifact
    exported by other code is not up to date, even at the same version number."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    files = [root / "cli.py"] + [p for d in ("core", "exporter", "targets", "calibration") for p in (root / d).rglob("*.py")]
    for p in sorted(f for f in files if f.is_file()):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _file_digest(path: str | None) -> str | None:
    """sha256 of a manifest file and every media file it names (so edited samples invalidate the cache)."""
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: file not found")
    h = hashlib.sha256(p.read_bytes())
    for line in p.read_text().splitlines():
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            continue
        for key in ("image", "audio"):
            if isinstance(d, dict) and d.get(key):
                f = Path(d[key]) if Path(d[key]).is_absolute() else p.parent / d[key]
                if f.is_file():
                    h.update(f.read_bytes())
    return h.hexdigest()


def _source_digest(model: dict[str, Any]) -> dict[str, Any]:
    """What identifies the weights: the preset (code-defined, seeded), or a checkpoint's files (name, size, mtime)."""
    if not model.get("checkpoint"):
        return {"preset": model["preset"], "layers": model["layers"]}
    root = Path(model["checkpoint"])
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    return {
        "checkpoint": str(root),
        "files": [[str(f.relative_to(root)), f.stat().st_size, int(f.stat().st_mtime)] for f in files],
    }


# --- build ---------------------------------------------------------------------------------


def build(config_path: Path | None, out: Path, progress: Progress | None = None) -> Path:
    """Build every artifact of the config into ``out``; returns the path of manifest.json.

    Raises ParityFailure (after writing every artifact and the manifest) when any artifact fails parity.
    """
    from core.artifact import check_output_dir, runtime_versions
    from core import __version__
    from exporter import export as ex
    from exporter import parity as parity_mod
    from exporter.reference import resolve_config

    progress = progress or (lambda stage, done, total: None)
    cfg = load_config(config_path)
    out = Path(out)

    # every check that can run before the work does, before --out is created: targets, recipes and their
    # options (as the export command checks them), the calibration and parity manifests (every bad line)
    m = cfg["model"]
    model_config = resolve_config(m["preset"], m["checkpoint"], m["layers"])  # unknown preset, bad checkpoint, bad layers
    plans = {}
    for a in cfg["artifacts"]:
        plans[a["name"]] = ex.plan(
            a["target"], a["recipe"], out / a["name"], cfg["calibration"]["manifest"], tuple(a["keep_float"]),
            a["group_size"], a["parity_target"], a["prune_heads"],
            a["skip_layers"], model_config, check_out=False, shared_calibration=True, check_floor=a["check_floor"],
            smooth=a["smooth"], gptq=a["gptq"], activation_range=a["activation_range"],
        )
    from calibration.manifest import read_manifest

    for path in (cfg["calibration"]["manifest"], cfg["parity"]["inputs"]):
        if path:
            read_manifest(Path(path))
    if out.is_dir() and all(p.name.startswith(STAGING_PREFIX) for p in out.iterdir()):
        _remove_stale_staging(out)  # a build killed before its first manifest left only staging dirs
    check_output_dir(out, marker=MANIFEST_NAME, what="an autoglm-export build")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create output directory {out}: {e.strerror or e}") from e
    _remove_stale_staging(out)

    config_sha = hashlib.sha256(config_text(config_path).encode()).hexdigest()
    versions = runtime_versions("executorch", "torchao", "coremltools", "onnx", "onnxruntime", "numpy")
    code = code_digest()
    source = _source_digest(cfg["model"])
    from core.dataset import calibration_manifest, heldout_manifest

    calib_digest = _file_digest(cfg["calibration"]["manifest"] or str(calibration_manifest()))
    parity_inputs = cfg["parity"]["inputs"]
    parity_digest = _file_digest(parity_inputs or str(heldout_manifest()))
    manifest_path = out / MANIFEST_NAME
    previous = _read_previous(manifest_path)

    entries: dict[str, dict[str, Any]] = {}
    todo: list[tuple[dict[str, Any], str, str]] = []  # (artifact, export key, parity key): export + parity
    recheck: list[tuple[dict[str, Any], str, str]] = []  # artifact intact, only parity inputs changed
    for a in cfg["artifacts"]:
        export_key = _sha(
            {
                "artifact": {k: a[k] for k in _EXPORT_KEYS
                             if k not in _OPTIONAL_EXPORT_KEYS or a[k] != _OPTIONAL_EXPORT_KEYS[k]},
                "source": source,
                "calibration": calib_digest if plans[a["name"]].needs_calibration or a["prune_heads"] or a["skip_layers"] else None,
                "package": __version__,
                "code": code,
                "versions": versions,
            }
        )
        parity_key = _sha({"thresholds": a["thresholds"], "inputs": parity_digest, "steps": cfg["parity"]["steps"]})
        prev = previous.get(a["name"])
        intact = bool(prev) and prev.get("export_key") == export_key and _up_to_date(out / a["name"], prev)
        if intact and prev.get("parity_key") == parity_key:
            entries[a["name"]] = {**prev, "reused": True}
        elif intact:
            recheck.append(({**a, "previous": prev}, export_key, parity_key))
        else:
            todo.append((a, export_key, parity_key))

    def write_manifest() -> None:
        manifest = {
            "schema": MANIFEST_SCHEMA,
            "schema_version": MANIFEST_SCHEMA_VERSION,
            "config_sha256": config_sha,  # sha256 of the TOML text (the embedded default's when no file)
            "config_path": str(config_path) if config_path else None,
            "config": cfg,
            "package_version": __version__,
            "code_sha256": code,
            "runtime_versions": versions,
            "artifacts": [entries[a["name"]] for a in cfg["artifacts"] if a["name"] in entries],
            "complete": len(entries) == len(cfg["artifacts"]),
        }
        _write_atomic(manifest_path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    def check_parity(a: dict[str, Any], adir: Path, out_dir: Path) -> dict[str, Any]:
        return parity_mod.run_parity(
            adir,
            inputs=Path(parity_inputs) if parity_inputs else None,
            out_dir=out_dir,
            thresholds=a["thresholds"],
            steps=cfg["parity"]["steps"],
            progress=progress,
            calibration_manifest=Path(cfg["calibration"]["manifest"]) if cfg["calibration"]["manifest"] else None,
        )

    with _terminate_as_exception():
        for a, export_key, parity_key in recheck:  # parity again on the intact artifact; reports swapped in atomically
            staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{a['name']}-", dir=out))
            try:
                final = out / a["name"]
                report = check_parity(a, final, staging / "parity")
                prev = a["previous"]
                entry = _entry(a, final, export_key, parity_key, report, prev.get("export", {}).get("build_wall_s", 0.0))
                _replace_dir(staging / "parity", final / "parity")
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            entries[a["name"]] = entry
            write_manifest()

    if not todo:
        write_manifest()
        _check_parity(entries)
        return manifest_path

    with _terminate_as_exception():
        from exporter.reference import load_reference, source_of

        progress("load reference", 0, 1)
        model = load_reference(preset=m["preset"], checkpoint=m["checkpoint"], layers=m["layers"])
        progress("load reference", 1, 1)
        record = source_of(m["preset"], m["checkpoint"], m["layers"])
        calibration_cache: dict[Any, Any] = {}  # calibrated once, shared by every artifact of the model

        for i, (a, export_key, parity_key) in enumerate(todo):
            progress(f"artifact {a['name']}", i, len(todo))
            staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{a['name']}-", dir=out))
            try:
                t0 = time.perf_counter()
                art = ex.export_model(model, plans[a["name"]], record, progress, out=staging / a["name"],
                                      calibration_cache=calibration_cache)
                export_s = time.perf_counter() - t0
                report = check_parity(a, art.dir, art.dir / "parity")
                entry = _entry(a, art.dir, export_key, parity_key, report, export_s)
                final = out / a["name"]
                _replace_dir(staging / a["name"], final)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            entries[a["name"]] = entry
            write_manifest()
            progress(f"artifact {a['name']}", i + 1, len(todo))
    _check_parity(entries)
    return manifest_path


def _entry(
    a: dict[str, Any], adir: Path, export_key: str, parity_key: str, report: dict[str, Any], export_s: float
) -> dict[str, Any]:
    info = json.loads((adir / "artifact.json").read_text())
    files = info.get("files", {})
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode())
        h.update(files[name]["sha256"].encode())
    from targets import target_spec

    spec = target_spec(a["target"])
    h2 = hashlib.sha256()
    excluded = {}
    for name in sorted(files):
        why = spec.nondeterministic(name)
        if why:
            excluded[name] = why
            continue
        h2.update(name.encode())
        h2.update(files[name]["sha256"].encode())
    return {
        "name": a["name"],
        "path": a["name"],
        "target": a["target"],
        "recipe": a["recipe"],
        "keep_float": a["keep_float"],
        "group_size": a["group_size"],
        "parity_target": a["parity_target"],
        "prune_heads": a["prune_heads"],
        "skip_layers": a["skip_layers"],
        "check_floor": a["check_floor"],
        "smooth": a["smooth"],
        "gptq": a["gptq"],
        "activation_range": a["activation_range"],
        "files": files,
        # sha256 over the artifact files' own hashes (artifact.json and parity/ hold timings and are excluded)
        "sha256": h.hexdigest(),
        # the same over the files this target writes reproducibly: two builds of one config must agree on it
        "sha256_reproducible": h2.hexdigest(),
        "not_reproducible": excluded,
        "size_bytes": sum(f["bytes"] for f in files.values()),
        "runner_interface": info.get("runner_interface", info.get("methods", {})),
        "programs": info.get("programs", {}),  # each method's real inputs/outputs, read back from the saved program
        "runtime_versions": info.get("runtime_versions", {}),
        "package_version": info.get("metadata", {}).get("package_version"),
        "export": {**info.get("export", {}), "build_wall_s": round(export_s, 3)},
        "export_key": export_key,  # inputs of the export: re-export when it changes
        "parity_key": parity_key,  # inputs of the parity check: re-check (no re-export) when only it changes
        "parity": {
            "passed": report["passed"],
            "failures": report["failures"],
            "provenance": report["provenance"]["artifact"],
            "numbers": report["provenance"]["artifact_numbers"],
            "methods": {
                n: {k: m[k] for k in ("max_abs", "mean_abs", "cosine", "sqnr_db")} for n, m in report["methods"].items()
            },
            "top1_agreement": report["decoder"]["top1_agreement"],
            "greedy_match": report["decoder"]["greedy_match"],
            "thresholds": report["thresholds"],
            "report": f"{a['name']}/parity/report.json",
        },
        "reused": False,
    }


def _check_parity(entries: dict[str, dict[str, Any]]) -> None:
    failed = [e for e in entries.values() if not e["parity"]["passed"]]
    if failed:
        raise ParityFailure(
            "parity failed: " + " | ".join(f"{e['name']}: {'; '.join(e['parity']['failures'])}" for e in failed),
            failures=[f"{e['name']}:{f.split(' ')[0]}" for e in failed for f in e["parity"]["failures"]],
        )


def _up_to_date(adir: Path, prev: dict[str, Any]) -> bool:
    from core.artifact import file_hashes

    if not (adir / "artifact.json").is_file() or not (adir / "parity" / "report.json").is_file():
        return False
    files = prev.get("files", {})
    try:
        return file_hashes(adir, list(files)) == files
    except OSError:
        return False


def _read_previous(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    if data.get("schema") != MANIFEST_SCHEMA or data.get("schema_version") != MANIFEST_SCHEMA_VERSION:
        return {}
    return {e["name"]: e for e in data.get("artifacts", []) if "name" in e}


def _replace_dir(src: Path, dest: Path) -> None:
    """Move a finished artifact into place; an older one is swapped out, then removed."""
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}old-{dest.name}-", dir=dest.parent))
        os.replace(dest, old / "x")
        os.replace(src, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dest)


def _remove_stale_staging(out: Path) -> None:
    for p in out.iterdir():
        if p.name.startswith(STAGING_PREFIX) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(f".{MANIFEST_NAME}.") and p.is_file():
            p.unlink(missing_ok=True)


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _Terminated(SystemExit):
    """Raised by the SIGTERM handler; exits with 128 + signal number once cleanup has run."""


class _terminate_as_exception:
    """SIGTERM raises inside the build so staging dirs are cleaned up (SIGKILL leaves them to the next build)."""

    def __enter__(self):
        self._old = None
        if threading.current_thread() is threading.main_thread():
            def handler(signum, frame):
                raise _Terminated(128 + signum)

            self._old = signal.signal(signal.SIGTERM, handler)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        return False
