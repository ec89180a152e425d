"""What every target shares between its program and artifact.json: metadata, method signatures,
the tokenizer files, and the export-time check (:func:`export_gate`) each program passes before it is
committed. The artifact directory itself and the Session protocol are core (core/artifact.py).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, TYPE_CHECKING

import numpy as np

from core.artifact import METHODS
from core.errors import ArtifactError, ExportError
from core.recipes import Recipe
from targets.spec import Gate


if TYPE_CHECKING:  # an annotation only: the model code is not imported for it
    from core.components import Components


@contextlib.contextmanager
def quiet(loggers: tuple[str, ...]) -> Iterator[io.StringIO]:
    """Silence a converter's chatter: stdout/stderr prints, warnings, and INFO logs of ``loggers`` (set to
    ERROR, restored after). Yields what was printed, for callers that read a tool's errors back from it."""
    buf = io.StringIO()
    found = [logging.getLogger(n) for n in loggers]
    levels = [lg.level for lg in found]
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        warnings.simplefilter("ignore")
        for lg in found:
            lg.setLevel(logging.ERROR)
        try:
            yield buf
        finally:
            for lg, level in zip(found, levels):
                lg.setLevel(level)


@contextlib.contextmanager
def native_stderr_without(markers: tuple[str, ...]) -> Iterator[None]:
    """Drop the lines containing any of ``markers`` that native code writes to fd 2 inside the block (a
    runtime's own log, which Python's redirects never see): fd 2 goes to a temporary file for the block, and
    every other line written there is passed on to stderr afterwards, in order."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [ln for ln in captured.read().decode(errors="replace").splitlines(keepends=True)
                    if not any(m in ln for m in markers)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


# --- what every artifact carries -------------------------------------------------


def artifact_metadata(config: Any, recipe: Recipe) -> dict[str, Any]:
    """Metadata every target stores (artifact.json, and in-format where the format has a place)."""
    from core import __version__

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


def method_signatures(components: Components) -> dict[str, dict[str, Any]]:
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
    from core.preprocess import tokenizer_file

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
    from core.preprocess import tokenizer_file

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
    from core.runner import load_tokenizer

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
    from core.runner import load_tokenizer

    if config.tokenizer:
        return load_tokenizer(config), f"the model's tokenizer ({config.tokenizer})"
    tiny = get_preset("tiny")
    if config.text.vocab_size < tiny.text.vocab_size:
        raise ExportError(f"model '{config.name}' names no tokenizer and its vocabulary is too small to check it with tiny's")
    return load_tokenizer(tiny), f"model '{config.name}' names no tokenizer: the tiny preset's tokenizer ids"


SEGMENT_METHOD = {"text": "token_embedding", "image": "vision_encoder", "audio": "audio_encoder"}


def method_calls(
    session: Any,
    runner: Any,
    segments: list[Any],
    decode_tokens: list[int],
    reference: "HeldOut | None" = None,
) -> dict[str, list[np.ndarray]]:
    """Each method's output per call on the same inputs, the decoder teacher-forced with the reference embeddings.

    Each segment is embedded through ``session`` right before its prefill (the stock runners' order: an
    ExecuTorch program's M-RoPE state reads it), then prefilled in one call with the reference embedding
    of it; every token of ``decode_tokens`` is then one T = 1 call with a growing cache. The reference
    embeddings come from ``reference`` when given (computed before the program was opened: the export
    check of a 9B cannot hold the eager model's working set and the program at once), else from
    ``runner`` (an eager Runner). Embeddings come back as [T, H], logits as [T, V].
    """
    from core.runner import Runner

    def segment_embeds(i: int, seg: Any) -> np.ndarray:
        return reference.embeds[i] if reference is not None else runner.embed(seg)

    def token_embeds(i: int, tok: int) -> np.ndarray:
        if reference is not None:
            return reference.token_embeds[i]
        return runner.session.run("token_embedding", tokens=np.array([[tok]], np.int64))

    mine = Runner(session, runner.config, runner.tokenizer)
    session.reset()
    out: dict[str, list[np.ndarray]] = {}
    start = 0
    for i, seg in enumerate(segments):
        e = mine.embed(seg)
        out.setdefault(SEGMENT_METHOD[seg.kind], []).append(e.reshape(-1, e.shape[-1]))
        out.setdefault("text_decoder", []).append(mine.decode(segment_embeds(i, seg), seg.position_ids, start))
        start += seg.length
    pos = int(segments[-1].position_ids.max()) + 1
    for i, tok in enumerate(decode_tokens):
        out["text_decoder"].append(mine.decode(token_embeds(i, tok), np.full((3, 1), pos, np.int64), start))
        start += 1
        pos += 1
    return out


def method_outputs(
    session: Any, runner: Any, segments: list[Any], decode_tokens: list[int], reference: "HeldOut | None" = None
) -> dict[str, np.ndarray]:
    """:func:`method_calls`, each method's calls concatenated along positions."""
    calls = method_calls(session, runner, segments, decode_tokens, reference)
    return {m: np.concatenate(v, axis=0) for m, v in calls.items()}


@dataclass
class HeldOut:
    """The export check's held-out sample run through eager: everything the check needs from the reference.

    Computed before the program is opened and kept as arrays, so the eager model's working set (at 9B,
    the mapped checkpoint pages each layer reads) and the program's weights are never resident together.
    """

    runner: Any  # a Runner on the eager session: config, tokenizer and segmenting only after this point
    tokenizer_note: str
    sample: str
    segments: list[Any]
    tokens: list[int]
    embeds: list[np.ndarray]  # per segment, the reference embedding the decoder is teacher-forced with
    token_embeds: list[np.ndarray]  # per decode token, likewise
    outputs: dict[str, np.ndarray]  # each method's eager outputs over all its calls


def held_out_reference(components: Components, decode_steps: int = 3) -> HeldOut:
    """One held-out prompt with its image and audio (never seen by calibration) through eager: the
    segments, ``decode_steps`` greedy tokens, the embeddings and each method's outputs over its calls."""
    from core.dataset import sample_inputs
    from core.runner import EagerSession, Prompt, Runner

    cfg = components.config
    tokenizer, tokenizer_note = check_tokenizer(cfg)
    media = sample_inputs()
    prompt = Prompt(text=media["prompt"], image=media["image"] if cfg.vision else None,
                    audio=media["audio"] if cfg.audio else None)
    eager = EagerSession(components)
    runner = Runner(eager, cfg, tokenizer)
    segments = runner.segments(prompt)
    tokens = runner.generate(prompt, max_new_tokens=decode_steps, stop_at_eos=False).tokens
    embeds = [runner.embed(seg) for seg in segments]
    token_embeds = [eager.run("token_embedding", tokens=np.array([[t]], np.int64)) for t in tokens]
    outputs = method_outputs(eager, runner, segments, tokens)
    eager.reset()
    return HeldOut(runner=runner, tokenizer_note=tokenizer_note, sample=media["image"].name, segments=segments,
                   tokens=tokens, embeds=embeds, token_embeds=token_embeds, outputs=outputs)


def export_gate(
    target: str,
    recipe: Recipe,
    session: Any,
    reference: "HeldOut | Components",
    gate: Gate,
) -> dict[str, Any]:
    """The export-time parity check every target runs on the program it just wrote, before committing it.

    ``reference`` is the held-out sample through eager (:func:`held_out_reference`; given components, it
    is computed here). Each method's outputs over all its calls (prefill per segment, then the
    teacher-forced decode calls) are compared. A method below the recipe's cosine floor, or above its
    relative-L2 ceiling (None: no ceiling), raises :class:`ExportError`, so the caller's atomic directory
    is discarded and nothing is written.
    """
    from core.metrics import compare, relative_l2

    held = reference if isinstance(reference, HeldOut) else held_out_reference(reference)
    segments, tokens = held.segments, held.tokens
    ref = held.outputs
    got = method_outputs(session, held.runner, segments, tokens, held)
    floor, ceiling = gate.floor_cosine, gate.max_relative_l2
    how = getattr(session, "provenance", target)
    methods: dict[str, dict[str, Any]] = {}
    for m in ref:
        try:
            r = compare(ref[m], got[m])
        except ValueError as e:  # the program's output has the wrong shape
            raise ExportError(f"{target} {recipe.name} program rejected by the export check: {m} {e}") from e
        r["relative_l2"] = relative_l2(r)
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
        "sample": held.sample,
        "tokenizer": held.tokenizer_note,
        "inputs": f"held-out prompt with its media ({sum(s.length for s in segments)} prompt positions, "
                  f"{len(tokens)} decode steps, teacher-forced)",
        "floor_cosine": floor,
        "max_relative_l2": ceiling,
        "methods": methods,
    }
