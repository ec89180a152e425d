"""The contract every target implements, and the artifact directory helpers they share.

A target turns :class:`exporter.components.Components` plus a :class:`Recipe`
into an artifact directory, and loads such a directory back as a
:class:`Session` that the shared host runner (``exporter/runner.py``) drives.

Artifact directory layout (DESIGN.md): the artifact file(s), the
``tokenizer.json`` it was built with, and ``artifact.json`` (target, recipe,
method signatures, metadata, runtime versions, sha256 of every file).
Everything is written into a temporary sibling directory and moved into
place at the end (:func:`atomic_artifact_dir`): a failed export leaves
nothing half-written behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

import numpy as np

from exporter.errors import ArtifactError, ExportError, OutputError, UnknownRecipeError

ARTIFACT_JSON = "artifact.json"
ARTIFACT_SCHEMA = 1
METHODS = ("token_embedding", "vision_encoder", "audio_encoder", "text_decoder")

# Progress callback: (stage, done, total). Targets call it during long work.
Progress = Callable[[str, int, int], None]


def no_progress(stage: str, done: int, total: int) -> None:  # pragma: no cover - trivial
    pass


@dataclass(frozen=True)
class Recipe:
    """How to turn float components into a deployable program.

    name: fp32 | fp16 | int8-weight | int8-static | 8da4w | int4-weight (which target offers which: targets.RECIPES_BY_TARGET)
    keep_float: module names (as in ``model.named_modules()``) left in float
    group_size: weight group size for 8da4w (0 = per channel)
    """

    name: str
    keep_float: tuple[str, ...] = ()
    group_size: int = 32

    @property
    def is_quantized(self) -> bool:
        return self.name not in ("fp32", "fp16")

    @property
    def needs_calibration(self) -> bool:
        return self.name == "int8-static"


ALL_RECIPES = ("fp32", "fp16", "int8-weight", "int8-static", "8da4w", "int4-weight")


def check_recipe(target: str, recipe: Recipe, supported: tuple[str, ...]) -> None:
    if recipe.name not in supported:
        known = "" if recipe.name in ALL_RECIPES else f" (known recipes: {', '.join(ALL_RECIPES)})"
        raise UnknownRecipeError(
            f"recipe '{recipe.name}' is not supported by target '{target}'; "
            f"it supports: {', '.join(supported)}{known}"
        )


@runtime_checkable
class Session(Protocol):
    """A loaded artifact. Inputs and outputs are NumPy arrays.

    Method inputs (identical names on every target):
      token_embedding(tokens int64 [1,T])                          -> embeds [1,T,H]
      vision_encoder(pixels float32 [1,3,S,S])                     -> image_embeds [1,N,H]
      audio_encoder(mel float32 [1,n_mels,F])                      -> audio_embeds [1,A,H]
      text_decoder(embeds [1,T,H], position_ids int64 [3,T],
                   cache_position int64 [T])                       -> logits [1,T,V]
    The KV cache lives inside the session; ``reset()`` forgets it.
    ``provenance`` says how numbers were obtained (e.g. "ExecuTorch runtime 1.5.1",
    "Core ML program emulated on Linux").
    """

    provenance: str

    def run(self, method: str, **inputs: np.ndarray) -> np.ndarray: ...

    def reset(self) -> None: ...


@dataclass
class Artifact:
    dir: Path
    target: str
    recipe: str
    files: list[str]
    info: dict[str, Any] = field(default_factory=dict)  # the whole artifact.json

    @property
    def metadata(self) -> dict[str, Any]:
        return self.info.get("metadata", {})


class Target(Protocol):
    name: str
    recipes: tuple[str, ...]

    def export(
        self,
        components: Any,  # exporter.components.Components
        recipe: Recipe,
        out: Path,
        calibration: Any | None = None,  # calibration.stats.CalibrationData
        progress: Progress = no_progress,
    ) -> Artifact: ...

    def load(self, artifact: Artifact) -> Session: ...


# --- artifact directory helpers ------------------------------------------------


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def tree_files(root: Path) -> list[Path]:
    """Every regular file under ``root`` (an .mlpackage is a directory), sorted."""
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file())


def file_hashes(root: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """sha256 and size of each listed file or directory (directories hash their files in order)."""
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        p = root / name
        if p.is_dir():
            h = hashlib.sha256()
            size = 0
            for f in tree_files(p):
                h.update(str(f.relative_to(p)).encode())
                h.update(sha256_file(f).encode())
                size += f.stat().st_size
            out[name] = {"sha256": h.hexdigest(), "bytes": size}
        else:
            out[name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return out


def check_output_dir(out: Path, option: str = "--out", marker: str = ARTIFACT_JSON,
                     what: str = "an autoglm-export artifact") -> None:
    """Refuse an output directory we must not replace or cannot create, before any work starts.

    Only an empty directory or a previous output of ours (it holds ``marker``) may be replaced;
    anything else is the user's data. The current directory (or one holding it) is never replaced.
    A new directory's nearest existing parent must take a new entry (probed with an empty temp dir).
    """
    out = Path(out)
    if not out.exists():
        parent = out.absolute().parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise OutputError(f"{option} {out}: {parent} is a file, not a directory")
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".autoglm-probe-", dir=parent))
        except OSError as e:
            raise OutputError(f"{option} {out}: cannot create it under {parent}: {e.strerror or e}") from None
        return
    if not out.is_dir():
        raise OutputError(f"{option} {out}: exists and is not a directory")
    here = Path.cwd().resolve()
    target = out.resolve()
    if target == here or target in here.parents:
        raise OutputError(f"{option} {out}: is the current directory or contains it; give a new directory name")
    if any(out.iterdir()) and not (out / marker).is_file():
        raise OutputError(
            f"{option} {out}: exists and is not {what} (no {marker}); choose a new directory or remove it yourself"
        )


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_siblings(out: Path) -> None:
    """Staging dirs a killed run left beside ``out`` (.NAME.partial-*, .NAME.work-*, .NAME.old-*)."""
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        return
    for kind in ("partial", "work", "old"):
        for p in parent.glob(f".{out.name}.{kind}-*"):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def atomic_artifact_dir(out: Path) -> Iterator[Path]:
    """Yield a fresh temp dir next to ``out``; on success it replaces ``out`` atomically.

    ``out`` must be new, empty, or a previous artifact (:func:`check_output_dir`). On any exception the
    temp dir is removed and ``out`` is left as it was. The directory gets the umask's permissions like any
    other output (mkdtemp's are 0700). Staging dirs of a killed earlier run on the same ``out`` are removed.
    """
    out = Path(out)
    check_output_dir(out)
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_siblings(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
        os.chmod(tmp, 0o777 & ~_umask())
    except OSError as e:
        raise OutputError(f"cannot write output directory {out}: {e.strerror or e}") from e
    try:
        yield tmp
        check_output_dir(out)  # nothing of the user's appeared there meanwhile
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            try:
                os.replace(out, old / "x")
                os.replace(tmp, out)
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_artifact_json(root: Path, info: dict[str, Any]) -> None:
    info = dict(info)
    info.setdefault("schema", ARTIFACT_SCHEMA)
    info["files"] = file_hashes(root, list(info.get("files", [])))
    (root / ARTIFACT_JSON).write_text(json.dumps(info, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_artifact(path: Path) -> Artifact:
    """Read an artifact directory (or a file inside one) and check its files' hashes exist."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"artifact not found: {path}")
    root = path if path.is_dir() else path.parent
    meta = root / ARTIFACT_JSON
    if not meta.is_file():
        raise ArtifactError(f"{root} is not an artifact directory: no {ARTIFACT_JSON}")
    try:
        info = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{meta}: unreadable artifact description: {e}") from e
    if not isinstance(info, dict):
        raise ArtifactError(f"{meta}: unreadable artifact description: not a JSON object")
    for key in ("target", "recipe", "files", "metadata"):
        if key not in info:
            raise ArtifactError(f"{meta}: missing key '{key}'")
    files = sorted(info["files"])
    for name in files:
        if not (root / name).exists():
            raise ArtifactError(f"{root}: artifact file '{name}' listed in {ARTIFACT_JSON} is missing")
    return Artifact(dir=root, target=info["target"], recipe=info["recipe"], files=files, info=info)


def verify_artifact(art: Artifact) -> None:
    """Before loading: every file's sha256 equals artifact.json's, and the runtimes are the recorded ones.

    A modified or corrupt file is an :class:`ArtifactError` (parity on it would prove nothing); a runtime
    version other than the one the artifact was written with is a warning on the ``autoglm_export`` logger.
    """
    import logging

    recorded = art.info.get("files", {})
    if not isinstance(recorded, dict):
        raise ArtifactError(f"{art.dir / ARTIFACT_JSON}: 'files' must map file names to their sha256 and size")
    for name, meta in sorted(recorded.items()):
        want = meta.get("sha256") if isinstance(meta, dict) else None
        if not want:
            raise ArtifactError(f"{art.dir / ARTIFACT_JSON}: no sha256 recorded for '{name}'")
        got = file_hashes(art.dir, [name])[name]["sha256"]
        if got != want:
            raise ArtifactError(
                f"{art.dir / name}: sha256 {got[:16]}... does not match artifact.json's {want[:16]}... "
                "(the file was modified or is corrupt); export it again"
            )
    from importlib.metadata import PackageNotFoundError, version

    log = logging.getLogger("autoglm_export")
    for package, wrote in sorted((art.info.get("runtime_versions") or {}).items()):
        try:
            have = version(package)
        except PackageNotFoundError:
            continue  # a runtime this session needs and lacks fails to load with its own error; others don't matter
        if have != wrote:
            log.warning(f"{art.dir.name}: written with {package} {wrote}, running with {package} {have}; "
                        "numbers may differ from the export-time check")


# --- what every artifact carries -------------------------------------------------


def artifact_metadata(config: Any, recipe: Recipe) -> dict[str, Any]:
    """Metadata every target stores (artifact.json, and in-format where the format has a place)."""
    from exporter import __version__

    t = config.tokens
    return {
        "model_name": config.name,
        "model": config.to_dict(),
        "max_seq_len": config.shape.max_seq_len,
        "vocab_size": config.text.vocab_size,
        "hidden_size": config.text.hidden_size,
        "bos_ids": list(t.bos_ids),
        "eos_ids": list(t.eos_ids),
        "image_size": config.shape.image_size if config.vision else 0,
        "image_tokens": config.image_tokens,
        "audio_frames": config.shape.audio_frames if config.audio else 0,
        "audio_tokens": config.audio_tokens,
        "n_mels": config.audio.n_mels if config.audio else 0,
        "image_token_id": t.image_token_id,
        "image_start_id": t.image_start_id,
        "image_end_id": t.image_end_id,
        "audio_token_id": t.audio_token_id,
        "audio_start_id": t.audio_start_id,
        "audio_end_id": t.audio_end_id,
        "recipe": recipe.name,
        "keep_float": list(recipe.keep_float),
        "package_version": __version__,
    }


def method_signatures(components: Any) -> dict[str, dict[str, Any]]:
    """Input/output names, dtypes and shapes (symbolic 'T' for the dynamic length) per method."""
    cfg = components.config
    h, v = cfg.text.hidden_size, cfg.text.vocab_size
    sigs: dict[str, dict[str, Any]] = {
        "token_embedding": {"inputs": {"tokens": ["int64", [1, "T"]]}, "outputs": {"embeds": ["float32", [1, "T", h]]}},
        "text_decoder": {
            "inputs": {
                "embeds": ["float32", [1, "T", h]],
                "position_ids": ["int64", [3, "T"]],
                "cache_position": ["int64", ["T"]],
            },
            "outputs": {"logits": ["float32", [1, "T", v]]},
        },
    }
    if cfg.vision:
        s = cfg.shape.image_size
        sigs["vision_encoder"] = {
            "inputs": {"pixels": ["float32", [1, 3, s, s]]},
            "outputs": {"image_embeds": ["float32", [1, cfg.image_tokens, h]]},
        }
    if cfg.audio:
        sigs["audio_encoder"] = {
            "inputs": {"mel": ["float32", [1, cfg.audio.n_mels, cfg.shape.audio_frames]]},
            "outputs": {"audio_embeds": ["float32", [1, cfg.audio_tokens, h]]},
        }
    return {m: sigs[m] for m in METHODS if m in sigs}


def copy_tokenizer(config: Any, dest_dir: Path) -> str:
    """Copy the tokenizer.json the model was built with into an artifact dir; returns its name."""
    from calibration.preprocess import tokenizer_file

    shutil.copyfile(tokenizer_file(config.tokenizer), dest_dir / "tokenizer.json")
    return "tokenizer.json"


def copy_tokenizer_files(config: Any, dest: Path) -> list[str]:
    """tokenizer.json and tokenizer_config.json (carrying the chat template), plus the checkpoint's
    special_tokens_map.json / generation_config.json where present.

    The runtimes' own tools read tokenizer_config.json beside tokenizer.json (onnxruntime-genai's
    og.Tokenizer refuses a folder without it; transformers' AutoTokenizer takes the chat template from it).
    A checkpoint's own file is kept, with the template added where it had none (transformers 5 saves it to
    chat_template.jinja); otherwise one is written from the model config.
    A model without a known tokenizer (a bare preset) ships none; the report says so.
    """
    from calibration.preprocess import tokenizer_file

    if not config.tokenizer:
        return []
    names = [copy_tokenizer(config, dest)]
    own = not config.tokenizer.startswith("builtin:")
    src = Path(tokenizer_file(config.tokenizer)).parent
    write_tokenizer_config(config, dest, src / "tokenizer_config.json" if own else None)
    names.append("tokenizer_config.json")
    for extra in ("special_tokens_map.json", "generation_config.json"):
        if own and (src / extra).is_file():
            shutil.copyfile(src / extra, dest / extra)
            names.append(extra)
    return names


def write_tokenizer_config(config: Any, dest: Path, source: Path | None = None) -> None:
    from exporter.model.templates import GLM_CHAT_TEMPLATE
    from exporter.runner import load_tokenizer

    info: dict[str, Any] = {}
    if source is not None and source.is_file():
        try:
            info = json.loads(source.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{source}: not valid JSON: {e}") from e
    if not info.get("chat_template"):
        info["chat_template"] = config.chat_template or GLM_CHAT_TEMPLATE
    if not info.get("eos_token") or "tokenizer_class" not in info:
        tok = load_tokenizer(config)
        info.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        info.setdefault("eos_token", tok.id_to_token(config.tokens.eos_ids[0]))
        info.setdefault("pad_token", tok.id_to_token(config.tokens.pad_id))
        info.setdefault("bos_token", None)
        info.setdefault("clean_up_tokenization_spaces", False)
        info.setdefault("model_max_length", config.shape.max_seq_len)
    (dest / "tokenizer_config.json").write_text(json.dumps(info, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def check_tokenizer(config: Any) -> tuple[Any, str]:
    """The tokenizer an export-time check prompts with, and where it came from.

    The model's own when it names one; a bare preset (random weights, e.g. the 9B widths without a
    checkpoint) names none, so the check tokenizes its held-out prompt with the tiny preset's tokenizer:
    its ids are all inside any preset's vocabulary, and only method equivalence is being checked.
    """
    from exporter.model import get_preset
    from exporter.runner import load_tokenizer

    if config.tokenizer:
        return load_tokenizer(config), f"the model's tokenizer ({config.tokenizer})"
    tiny = get_preset("tiny")
    if config.text.vocab_size < tiny.text.vocab_size:
        raise ExportError(f"model '{config.name}' names no tokenizer and its vocabulary is too small to check it with tiny's")
    return load_tokenizer(tiny), f"model '{config.name}' names no tokenizer: the tiny preset's tokenizer ids"


SEGMENT_METHOD = {"text": "token_embedding", "image": "vision_encoder", "audio": "audio_encoder"}


def method_calls(session: Any, runner: Any, segments: list[Any], decode_tokens: list[int]) -> dict[str, list[np.ndarray]]:
    """Each method's output per call on the same inputs, the decoder teacher-forced with ``runner``'s embeddings.

    Each segment is embedded through ``session`` right before its prefill (the stock runners' order: an
    ExecuTorch program's M-RoPE state reads it), then prefilled in one call with ``runner``'s (reference)
    embedding of it; every token of ``decode_tokens`` is then one T = 1 call with a growing cache.
    Embeddings come back as [T, H], logits as [T, V].
    """
    from exporter.runner import Runner

    mine = Runner(session, runner.config, runner.tokenizer)
    session.reset()
    out: dict[str, list[np.ndarray]] = {}
    start = 0
    for seg in segments:
        e = mine.embed(seg)
        out.setdefault(SEGMENT_METHOD[seg.kind], []).append(e.reshape(-1, e.shape[-1]))
        out.setdefault("text_decoder", []).append(mine.decode(runner.embed(seg), seg.position_ids, start))
        start += seg.length
    pos = int(segments[-1].position_ids.max()) + 1
    for tok in decode_tokens:
        emb = runner.session.run("token_embedding", tokens=np.array([[tok]], np.int64))
        out["text_decoder"].append(mine.decode(emb, np.full((3, 1), pos, np.int64), start))
        start += 1
        pos += 1
    return out


def method_outputs(session: Any, runner: Any, segments: list[Any], decode_tokens: list[int]) -> dict[str, np.ndarray]:
    """:func:`method_calls`, each method's calls concatenated along positions."""
    return {m: np.concatenate(v, axis=0) for m, v in method_calls(session, runner, segments, decode_tokens).items()}


def export_gate(
    target: str,
    recipe: Recipe,
    session: Any,
    components: Any,
    floors: dict[str, tuple[float, float | None]],
    decode_steps: int = 3,
) -> dict[str, Any]:
    """The export-time parity check every target runs on the program it just wrote, before committing it.

    One held-out prompt with its image and audio (never seen by calibration) goes through eager and
    through ``session``; each method's outputs over all its calls (prefill per segment, then
    ``decode_steps`` teacher-forced decode calls) are compared. A method below the recipe's cosine
    floor, or above its relative-L2 ceiling (None: no ceiling), raises :class:`ExportError`, so the
    caller's atomic directory is discarded and nothing is written.
    """
    from calibration.dataset import sample_inputs
    from exporter.parity import compare
    from exporter.runner import EagerSession, Prompt, Runner

    cfg = components.config
    tokenizer, tokenizer_note = check_tokenizer(cfg)
    media = sample_inputs()
    prompt = Prompt(text=media["prompt"], image=media["image"] if cfg.vision else None,
                    audio=media["audio"] if cfg.audio else None)
    eager = EagerSession(components)
    runner = Runner(eager, cfg, tokenizer)
    segments = runner.segments(prompt)
    tokens = runner.generate(prompt, max_new_tokens=decode_steps, stop_at_eos=False).tokens
    ref = method_outputs(eager, runner, segments, tokens)
    got = method_outputs(session, runner, segments, tokens)
    eager.reset()
    floor, ceiling = floors[recipe.name]
    how = getattr(session, "provenance", target)
    methods: dict[str, dict[str, Any]] = {}
    for m in ref:
        try:
            r = compare(ref[m], got[m])
        except ValueError as e:  # the program's output has the wrong shape
            raise ExportError(f"{target} {recipe.name} program rejected by the export check: {m} {e}") from e
        sqnr = r["sqnr_db"]
        r["relative_l2"] = None if not r["finite"] else (0.0 if sqnr is None else 10.0 ** (-sqnr / 20.0))
        methods[m] = r
        cos, rel = r["cosine"], r["relative_l2"]
        if cos is None or cos < floor or (ceiling is not None and rel > ceiling):
            found = "non-finite outputs" if cos is None else f"cosine {cos:.5f}, relative L2 {rel:.4f}"
            need = f"cosine >= {floor}" + (f", relative L2 <= {ceiling}" if ceiling is not None else "")
            raise ExportError(
                f"{target} {recipe.name} program rejected by the export check: {m} {found} (needs {need}) "
                f"vs the eager reference on a held-out sample ({how})"
            )
    return {
        "measured": True,
        "how": how,
        "sample": media["image"].name,
        "tokenizer": tokenizer_note,
        "inputs": f"held-out prompt with its media ({sum(s.length for s in segments)} prompt positions, "
                  f"{len(tokens)} decode steps, teacher-forced)",
        "floor_cosine": floor,
        "max_relative_l2": ceiling,
        "methods": methods,
    }


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def runtime_versions(*packages: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in ("torch", *packages):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = "not installed"
    return out
