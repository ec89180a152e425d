"""The bad-input catalogue (issue 18): every bad input gets exit 2 (3 for a runtime or export failure),
one ``error:`` line naming the file, key, line or option, no traceback, and nothing written or deleted.

Each case builds its inputs in an empty working directory, snapshots it, runs the CLI in-process there,
and checks the exit code, the one line, and that the directory (and any --out) is exactly as before.
The expensive inputs (a valid checkpoint, an exported artifact, a 1-layer calibration result) are built
once per module and copied per case.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app

ROOT = Path(__file__).resolve().parents[1]
INPUTS = ROOT / "examples" / "inputs"


# --- shared inputs ------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A valid transformers-written Glm4v checkpoint (tiny widths, tiny tokenizer) and a tiny ORT artifact."""
    import torch
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration

    from core.preprocess import tokenizer_file
    from exporter.model.config import TINY_SPECIALS
    from exporter.model.templates import GLM4V_CHAT_TEMPLATE

    root = tmp_path_factory.mktemp("base")
    ids = {s: i for i, s in enumerate(TINY_SPECIALS)}
    ck = root / "ckpt"
    cfg = Glm4vConfig(
        text_config=dict(vocab_size=2048, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, eos_token_id=[0],
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5,
                                              mrope_section=[1, 1, 2])),
        vision_config=dict(depth=1, hidden_size=32, num_heads=4, out_hidden_size=64, intermediate_size=64, image_size=56),
        image_token_id=ids["<|image|>"], image_start_token_id=ids["<|begin_of_image|>"],
        image_end_token_id=ids["<|end_of_image|>"], video_token_id=2047,
    )
    torch.manual_seed(0)
    Glm4vForConditionalGeneration(cfg).save_pretrained(ck)
    shutil.copyfile(tokenizer_file("builtin:tiny"), ck / "tokenizer.json")
    (ck / "tokenizer_config.json").write_text(json.dumps({"chat_template": GLM4V_CHAT_TEMPLATE, "eos_token": "<|endoftext|>"}))
    r = CliRunner().invoke(app, ["export", "--target", "ort", "--recipe", "fp32", "--out", str(root / "art")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["calibrate", "--layers", "1", "--out", str(root / "calib1")])
    assert r.exit_code == 0, r.output
    return root


def ck(tmp: Path, base: Path, edit=None) -> str:
    """A copy of the valid checkpoint, ``edit(config_dict)`` applied to config.json when given."""
    d = tmp / "ck"
    shutil.copytree(base / "ckpt", d)
    if edit is not None:
        raw = json.loads((d / "config.json").read_text())
        raw = edit(raw)
        (d / "config.json").write_text(json.dumps(raw))
    return str(d)


def tc(**kv):
    def edit(raw):
        raw["text_config"].update(kv)
        return raw
    return edit


def vc(**kv):
    def edit(raw):
        raw["vision_config"].update(kv)
        return raw
    return edit


def top(**kv):
    def edit(raw):
        raw.update(kv)
        return raw
    return edit


def shard(d: str) -> Path:
    return next(Path(d).glob("*.safetensors"))


def rewrite_header(path: Path, fn) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    new = json.dumps(fn(header)).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n :])


def retype(name_part: str, dtype: str, fill: bytes | None = None):
    """Relabel one tensor's dtype (same byte count) or overwrite its bytes."""
    def fn(d: str) -> str:
        p = shard(d)
        data = bytearray(p.read_bytes())
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        key = next(k for k in header if name_part in k)
        if fill is not None:
            a, b = header[key]["data_offsets"]
            data[8 + n + a : 8 + n + b] = (fill * ((b - a) // len(fill) + 1))[: b - a]
            p.write_bytes(bytes(data))
        if dtype:
            header[key]["dtype"] = dtype
            rewrite_header(p, lambda h: {**h, key: header[key]})
        return d
    return fn


def art(tmp: Path, base: Path, edit=None) -> str:
    d = tmp / "art"
    shutil.copytree(base / "art", d)
    if edit is not None:
        edit(d)
    return str(d)


def art_json(fn):
    def edit(d: Path):
        p = d / "artifact.json"
        p.write_text(json.dumps(fn(json.loads(p.read_text()))))
    return edit


def write(tmp: Path, name: str, text: str | bytes) -> str:
    p = tmp / name
    p.parent.mkdir(parents=True, exist_ok=True)
    (p.write_bytes if isinstance(text, bytes) else p.write_text)(text)
    return str(p)


def manifest(tmp: Path, lines: list[str]) -> str:
    return write(tmp, "m.jsonl", "\n".join(lines) + "\n")


G = ["generate", "--prompt", "hi"]
E = ["export", "--target", "ort", "--recipe", "fp32", "--out", "out"]
E8 = ["export", "--target", "executorch", "--recipe", "8da4w", "--out", "out"]
C = ["calibrate", "--out", "cal"]
IMG = str(INPUTS / "photo.jpg")

ART = '[[artifact]]\nname = "a"\ntarget = "ort"\nrecipe = "fp32"\n'

# (id, lambda tmp, base -> argv, exit code)
CASES = [
    # checkpoints: paths and config.json
    ("ckpt-missing", lambda t, b: [*G, "--checkpoint", "nope"], 2),
    ("ckpt-is-file", lambda t, b: [*G, "--checkpoint", write(t, "f.txt", "x")], 2),
    ("ckpt-empty-dir", lambda t, b: [*G, "--checkpoint", str((t / "e").mkdir() or t / "e")], 2),
    ("ckpt-config-not-json", lambda t, b: [*G, "--checkpoint", ck(t, b, None) if not write(t, "ck/config.json", "{") else str(t / "ck")], 2),
    ("ckpt-config-list", lambda t, b: [*G, "--checkpoint", ck(t, b, lambda r: [r])], 2),
    ("ckpt-text-config-list", lambda t, b: [*G, "--checkpoint", ck(t, b, top(text_config=[1, 2]))], 2),
    ("ckpt-vision-config-string", lambda t, b: [*G, "--checkpoint", ck(t, b, top(vision_config="big"))], 2),
    ("ckpt-no-text-config", lambda t, b: [*G, "--checkpoint", ck(t, b, lambda r: {k: v for k, v in r.items() if k != "text_config"})], 2),
    ("ckpt-heads-0", lambda t, b: [*G, "--checkpoint", ck(t, b, tc(num_attention_heads=0))], 2),
    ("ckpt-heads-negative", lambda t, b: [*G, "--checkpoint", ck(t, b, tc(num_attention_heads=-4))], 2),
    ("ckpt-kv-heads-0", lambda t, b: [*G, "--checkpoint", ck(t, b, tc(num_key_value_heads=0))], 2),
    ("ckpt-hidden-not-divisible", lambda t, b: [*G, "--checkpoint", ck(t, b, tc(hidden_size=66))], 2),
    ("ckpt-layers-0", lambda t, b: [*G, "--checkpoint", ck(t, b, tc(num_hidden_layers=0))], 2),
    ("ckpt-layers-million-info", lambda t, b: ["info", "--checkpoint", ck(t, b, tc(num_hidden_layers=1_000_000))], 2),
    ("ckpt-vocab-0", lambda t, b: [*G, "--checkpoint", ck(t, b, tc(vocab_size=0))], 2),
    ("ckpt-vocab-string", lambda t, b: [*G, "--checkpoint", ck(t, b, tc(vocab_size="big"))], 2),
    ("ckpt-vocab-float", lambda t, b: [*G, "--checkpoint", ck(t, b, tc(vocab_size=2048.5))], 2),
    ("ckpt-hidden-bool", lambda t, b: [*G, "--checkpoint", ck(t, b, tc(hidden_size=True))], 2),
    ("ckpt-eps-negative", lambda t, b: [*G, "--checkpoint", ck(t, b, tc(rms_norm_eps=-1.0))], 2),
    ("ckpt-model-type-llama", lambda t, b: [*G, "--checkpoint", ck(t, b, top(model_type="llama"))], 2),
    ("ckpt-hidden-act-gelu", lambda t, b: [*G, "--checkpoint", ck(t, b, tc(hidden_act="gelu"))], 2),
    ("ckpt-rope-yarn", lambda t, b: [*G, "--checkpoint", ck(t, b, tc(rope_parameters={"rope_type": "yarn"}))], 2),
    ("ckpt-mrope-bad-sum", lambda t, b: [*G, "--checkpoint", ck(t, b, tc(rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.5, "mrope_section": [1, 1, 1]}))], 2),
    ("ckpt-vision-depth-0", lambda t, b: [*G, "--checkpoint", ck(t, b, vc(depth=0))], 2),
    ("ckpt-vision-heads-0", lambda t, b: [*G, "--checkpoint", ck(t, b, vc(num_heads=0))], 2),
    ("ckpt-image-token-out-of-vocab", lambda t, b: [*G, "--checkpoint", ck(t, b, top(image_token_id=999999))], 2),
    ("ckpt-eos-out-of-vocab", lambda t, b: [*G, "--checkpoint", ck(t, b, tc(eos_token_id=[5000]))], 2),
    ("ckpt-eos-string", lambda t, b: [*G, "--checkpoint", ck(t, b, tc(eos_token_id="x"))], 2),
    # checkpoints: weights
    ("ckpt-no-safetensors", lambda t, b: [*G, "--checkpoint", (lambda d: [os.remove(p) for p in Path(d).glob("*.safetensors")] and d)(ck(t, b))], 2),
    ("ckpt-truncated-shard", lambda t, b: [*G, "--checkpoint", (lambda d: shard(d).write_bytes(shard(d).read_bytes()[:5000]) and d)(ck(t, b))], 2),
    ("ckpt-shard-4-bytes", lambda t, b: [*G, "--checkpoint", (lambda d: shard(d).write_bytes(b"abcd") and d)(ck(t, b))], 2),
    ("ckpt-header-list", lambda t, b: [*G, "--checkpoint", (lambda d: rewrite_header(shard(d), lambda h: [1, 2]) or d)(ck(t, b))], 2),
    ("ckpt-header-entry-not-dict", lambda t, b: [*G, "--checkpoint", (lambda d: rewrite_header(shard(d), lambda h: {**h, next(iter(k for k in h if k != "__metadata__")): 7}) or d)(ck(t, b))], 2),
    ("ckpt-header-bad-offsets", lambda t, b: [*G, "--checkpoint", (lambda d: rewrite_header(shard(d), lambda h: {k: ({**v, "data_offsets": "x"} if k != "__metadata__" else v) for k, v in h.items()}) or d)(ck(t, b))], 2),
    ("ckpt-header-huge-length", lambda t, b: [*G, "--checkpoint", (lambda d: shard(d).write_bytes(struct.pack("<Q", 1 << 60) + shard(d).read_bytes()[8:]) and d)(ck(t, b))], 2),
    ("ckpt-header-not-json", lambda t, b: [*G, "--checkpoint", (lambda d: shard(d).write_bytes(struct.pack("<Q", 4) + b"{{{{" ) and d)(ck(t, b))], 2),
    ("ckpt-unknown-dtype", lambda t, b: [*G, "--checkpoint", retype("norm", "F8_E4M3")(ck(t, b))], 2),
    ("ckpt-int32-weights", lambda t, b: [*G, "--checkpoint", retype("q_proj.weight", "I32")(ck(t, b))], 2),
    ("ckpt-nan-weights", lambda t, b: [*G, "--checkpoint", retype("q_proj.weight", "", fill=struct.pack("<f", float("nan")))(ck(t, b))], 2),
    ("ckpt-inf-weights", lambda t, b: [*G, "--checkpoint", retype("embed_tokens", "", fill=struct.pack("<f", float("inf")))(ck(t, b))], 2),
    ("ckpt-missing-key", lambda t, b: [*G, "--checkpoint", (lambda d: rewrite_header(shard(d), lambda h: {k: v for k, v in h.items() if "lm_head" not in k}) or d)(ck(t, b))], 2),
    ("ckpt-unexpected-key", lambda t, b: [*G, "--checkpoint", (lambda d: rewrite_header(shard(d), lambda h: {**h, "model.extra.weight": next(v for k, v in h.items() if k != "__metadata__")}) or d)(ck(t, b))], 2),
    ("ckpt-wrong-shape", lambda t, b: [*G, "--checkpoint", ck(t, b, tc(intermediate_size=100))], 2),
    ("ckpt-index-no-weight-map", lambda t, b: [*G, "--checkpoint", (lambda d: write(Path(d), "model.safetensors.index.json", "{}") and d)(ck(t, b))], 2),
    ("ckpt-index-missing-shard", lambda t, b: [*G, "--checkpoint", (lambda d: write(Path(d), "model.safetensors.index.json", json.dumps({"weight_map": {"a": "model-00009.safetensors"}})) and d)(ck(t, b))], 2),
    ("ckpt-index-not-json", lambda t, b: [*G, "--checkpoint", (lambda d: write(Path(d), "model.safetensors.index.json", "nope") and d)(ck(t, b))], 2),
    ("ckpt-tokenizer-corrupt", lambda t, b: [*G, "--checkpoint", (lambda d: write(Path(d), "tokenizer.json", "{") and d)(ck(t, b))], 2),
    ("ckpt-tokenizer-vocab-too-big", lambda t, b: [*G, "--checkpoint", ck(t, b, tc(vocab_size=1024))], 2),
    ("ckpt-tokenizer-config-not-json", lambda t, b: [*G, "--checkpoint", (lambda d: write(Path(d), "tokenizer_config.json", "[") and d)(ck(t, b))], 2),
    ("ckpt-chat-template-broken", lambda t, b: [*G, "--checkpoint", (lambda d: write(Path(d), "chat_template.jinja", "{% for %}") and d)(ck(t, b))], 2),
    ("ckpt-chat-template-not-string", lambda t, b: [*G, "--checkpoint", (lambda d: write(Path(d), "tokenizer_config.json", json.dumps({"chat_template": 5})) and d)(ck(t, b))], 2),
    ("ckpt-generation-config-not-json", lambda t, b: [*G, "--checkpoint", (lambda d: write(Path(d), "generation_config.json", "{,}") and d)(ck(t, b))], 2),
    ("ckpt-with-layers", lambda t, b: [*G, "--checkpoint", ck(t, b), "--layers", "1"], 2),
    ("ckpt-and-preset", lambda t, b: [*G, "--checkpoint", ck(t, b), "--preset", "tiny"], 2),
    # generate options
    ("gen-max-new-0", lambda t, b: [*G, "--max-new-tokens", "0"], 2),
    ("gen-max-new-negative", lambda t, b: [*G, "--max-new-tokens", "-1"], 2),
    ("gen-max-new-not-int", lambda t, b: [*G, "--max-new-tokens", "many"], 2),
    ("gen-temperature-nan", lambda t, b: [*G, "--temperature", "nan"], 2),
    ("gen-temperature-inf", lambda t, b: [*G, "--temperature", "inf"], 2),
    ("gen-temperature-negative", lambda t, b: [*G, "--temperature", "-1"], 2),
    ("gen-top-p-2", lambda t, b: [*G, "--top-p", "2"], 2),
    ("gen-top-p-0", lambda t, b: [*G, "--top-p", "0"], 2),
    ("gen-top-p-nan", lambda t, b: [*G, "--top-p", "nan"], 2),
    ("gen-seed-negative", lambda t, b: [*G, "--seed", "-5", "--temperature", "0.7"], 2),
    ("gen-image-missing", lambda t, b: [*G, "--image", "nope.png"], 2),
    ("gen-image-is-dir", lambda t, b: [*G, "--image", str(t)], 2),
    ("gen-image-not-image", lambda t, b: [*G, "--image", write(t, "x.png", "not a png")], 2),
    ("gen-image-empty", lambda t, b: [*G, "--image", write(t, "e.jpg", b"")], 2),
    ("gen-audio-missing", lambda t, b: [*G, "--audio", "nope.wav"], 2),
    ("gen-audio-not-wav", lambda t, b: [*G, "--audio", write(t, "a.wav", "RIFFnope")], 2),
    ("gen-audio-is-image", lambda t, b: [*G, "--audio", IMG], 2),
    ("gen-audio-is-dir", lambda t, b: [*G, "--audio", str(t)], 2),
    ("gen-unknown-preset", lambda t, b: [*G, "--preset", "gpt5"], 2),
    ("gen-layers-0", lambda t, b: [*G, "--layers", "0"], 2),
    ("gen-layers-negative", lambda t, b: [*G, "--layers", "-2"], 2),
    ("gen-layers-1000", lambda t, b: [*G, "--layers", "1000"], 2),
    ("gen-thinking-no-switch", lambda t, b: [*G, "--thinking"], 2),
    ("gen-prompt-too-long", lambda t, b: ["generate", "--prompt", "word " * 600], 2),
    ("ckpt-vision-weights-without-config", lambda t, b: [*G, "--image", IMG, "--checkpoint", ck(t, b, lambda r: {k: v for k, v in r.items() if k != "vision_config"})], 2),
    # artifacts
    ("art-missing", lambda t, b: [*G, "--artifact", "nope"], 2),
    ("art-not-artifact-dir", lambda t, b: [*G, "--artifact", str(t)], 2),
    ("art-json-corrupt", lambda t, b: [*G, "--artifact", art(t, b, lambda d: (d / "artifact.json").write_text("{"))], 2),
    ("art-json-list", lambda t, b: [*G, "--artifact", art(t, b, lambda d: (d / "artifact.json").write_text("[]"))], 2),
    ("art-json-missing-key", lambda t, b: [*G, "--artifact", art(t, b, art_json(lambda i: {k: v for k, v in i.items() if k != "target"}))], 2),
    ("art-unknown-target", lambda t, b: [*G, "--artifact", art(t, b, art_json(lambda i: {**i, "target": "tflite"}))], 2),
    ("art-file-missing", lambda t, b: [*G, "--artifact", art(t, b, lambda d: (d / "text_decoder.onnx").unlink())], 2),
    ("art-file-tampered", lambda t, b: [*G, "--artifact", art(t, b, lambda d: (d / "token_embedding.onnx").write_bytes((d / "token_embedding.onnx").read_bytes()[:-1] + b"\0"))], 2),
    ("art-file-truncated", lambda t, b: [*G, "--artifact", art(t, b, lambda d: (d / "text_decoder.onnx").write_bytes(b"x"))], 2),
    ("art-model-config-corrupt", lambda t, b: [*G, "--artifact", art(t, b, art_json(lambda i: {**i, "metadata": {**i["metadata"], "model": {"name": "x"}}}))], 2),
    ("parity-art-missing", lambda t, b: ["parity", "nope"], 2),
    ("parity-art-tampered", lambda t, b: ["parity", art(t, b, lambda d: (d / "token_embedding.onnx").write_bytes((d / "token_embedding.onnx").read_bytes()[:-1] + b"\0"))], 2),
    ("parity-inputs-missing", lambda t, b: ["parity", art(t, b), "--inputs", "nope.jsonl"], 2),
    ("parity-inputs-malformed", lambda t, b: ["parity", art(t, b), "--inputs", manifest(t, ['{"text": "ok"}', "{bad"])], 2),
    ("parity-threshold-unknown-method", lambda t, b: ["parity", art(t, b), "--threshold", "nosuch.cosine=0.9"], 2),
    ("parity-threshold-unknown-metric", lambda t, b: ["parity", art(t, b), "--threshold", "text_decoder.nosuch=0.9"], 2),
    ("parity-threshold-no-value", lambda t, b: ["parity", art(t, b), "--threshold", "text_decoder.cosine"], 2),
    ("parity-threshold-not-number", lambda t, b: ["parity", art(t, b), "--threshold", "text_decoder.cosine=high"], 2),
    ("parity-out-is-file", lambda t, b: ["parity", art(t, b), "--out", write(t, "report.txt", "mine")], 2),
    ("parity-steps-0", lambda t, b: ["parity", art(t, b), "--steps", "0"], 2),
    ("parity-steps-negative", lambda t, b: ["parity", art(t, b), "--steps", "-3"], 2),
    ("bench-art-missing", lambda t, b: ["bench", "nope"], 2),
    ("bench-not-artifact", lambda t, b: ["bench", str(t)], 2),
    ("bench-json-is-dir", lambda t, b: ["bench", art(t, b), "--json", str(t)], 2),
    ("bench-art-tampered", lambda t, b: ["bench", art(t, b, lambda d: (d / "token_embedding.onnx").write_bytes(b"tampered"))], 2),
    # export options
    ("export-unknown-target", lambda t, b: ["export", "--target", "tflite", "--recipe", "fp32", "--out", "out"], 2),
    ("export-unknown-recipe", lambda t, b: ["export", "--target", "ort", "--recipe", "int3", "--out", "out"], 2),
    ("export-recipe-unsupported", lambda t, b: ["export", "--target", "ort", "--recipe", "fp16", "--out", "out"], 2),
    ("export-out-is-file", lambda t, b: ["export", "--target", "ort", "--recipe", "fp32", "--out", write(t, "out", "mine")], 2),
    ("export-out-user-dir", lambda t, b: (write(t, "out/thesis.txt", "x") and E), 2),
    ("export-out-dot", lambda t, b: [*E[:-1], "."], 2),
    ("export-out-parent", lambda t, b: [*E[:-1], ".."], 2),
    ("export-out-under-proc", lambda t, b: [*E[:-1], "/proc/autoglm-out"], 2),
    ("export-out-under-file", lambda t, b: [*E[:-1], os.path.join(write(t, "plain", "x"), "sub")], 2),
    ("export-calibration-missing", lambda t, b: [*E, "--recipe", "int8-static", "--calibration", "nope"], 2),
    ("export-calibration-not-result", lambda t, b: [*E, "--recipe", "int8-static", "--calibration", str((t / "emptycal").mkdir() or t / "emptycal")], 2),
    ("export-calibration-other-model", lambda t, b: [*E, "--recipe", "int8-static", "--calibration", str(b / "calib1")], 2),
    ("export-calibration-bad-manifest", lambda t, b: [*E, "--recipe", "int8-static", "--calibration", manifest(t, ["{nope"])], 2),
    ("export-keep-float-unknown", lambda t, b: [*E, "--recipe", "int8-weight", "--keep-float", "no.such.module"], 2),
    ("export-keep-float-on-fp32", lambda t, b: [*E, "--keep-float", "text.layers.0.mlp.down_proj"], 2),
    ("export-group-size-7", lambda t, b: [*E8, "--group-size", "7"], 2),
    ("export-group-size-negative", lambda t, b: [*E8, "--group-size", "-1"], 2),
    ("export-group-size-on-fp32", lambda t, b: [*E, "--group-size", "64"], 2),
    ("export-group-size-on-et-int8-weight",
     lambda t, b: ["export", "--target", "executorch", "--recipe", "int8-weight", "--group-size", "32", "--out", "out"], 2),
    ("export-group-size-48-on-ort-int8-weight",
     lambda t, b: ["export", "--target", "ort", "--recipe", "int8-weight", "--group-size", "48", "--out", "out"], 2),
    ("export-parity-target-garbage", lambda t, b: [*E, "--recipe", "int8-weight", "--parity-target", "cos"], 2),
    ("export-parity-target-range", lambda t, b: [*E, "--recipe", "int8-weight", "--parity-target", "cos=2"], 2),
    ("export-parity-target-metric", lambda t, b: [*E, "--recipe", "int8-weight", "--parity-target", "foo=0.9"], 2),
    ("export-parity-target-on-fp32", lambda t, b: [*E, "--parity-target", "cos=0.999"], 2),
    ("export-layers-0", lambda t, b: [*E, "--layers", "0"], 2),
    ("export-unknown-preset", lambda t, b: [*E, "--preset", "huge"], 2),
    ("export-bad-checkpoint", lambda t, b: [*E, "--checkpoint", ck(t, b, tc(num_attention_heads=0))], 2),
    # calibrate
    ("calib-out-is-file", lambda t, b: ["calibrate", "--out", write(t, "cal", "mine")], 2),
    ("calib-out-user-dir", lambda t, b: (write(t, "cal/notes.txt", "x") and C), 2),
    ("calib-out-under-proc", lambda t, b: ["calibrate", "--out", "/proc/autoglm-cal"], 2),
    ("calib-manifest-missing", lambda t, b: [*C, "--manifest", "nope.jsonl"], 2),
    ("calib-manifest-is-dir", lambda t, b: [*C, "--manifest", str(t)], 2),
    ("calib-manifest-empty", lambda t, b: [*C, "--manifest", write(t, "m.jsonl", "")], 2),
    ("calib-manifest-not-json", lambda t, b: [*C, "--manifest", manifest(t, ["not json"])], 2),
    ("calib-manifest-list-line", lambda t, b: [*C, "--manifest", manifest(t, ["[1, 2]"])], 2),
    ("calib-manifest-unknown-key", lambda t, b: [*C, "--manifest", manifest(t, ['{"text": "a", "video": "v.mp4"}'])], 2),
    ("calib-manifest-text-not-string", lambda t, b: [*C, "--manifest", manifest(t, ['{"text": 5}'])], 2),
    ("calib-manifest-image-missing", lambda t, b: [*C, "--manifest", manifest(t, ['{"text": "a", "image": "nope.png"}'])], 2),
    ("calib-manifest-image-corrupt", lambda t, b: [*C, "--manifest", (write(t, "bad.png", "xx") and manifest(t, ['{"text": "a", "image": "bad.png"}']))], 2),
    ("calib-manifest-audio-corrupt", lambda t, b: [*C, "--manifest", (write(t, "bad.wav", "RIFF") and manifest(t, ['{"text": "a", "audio": "bad.wav"}']))], 2),
    ("calib-manifest-empty-object", lambda t, b: [*C, "--manifest", manifest(t, ["{}"])], 2),
    ("calib-sensitivity-recipe", lambda t, b: [*C, "--sensitivity", "--sensitivity-recipe", "int4"], 2),
    ("calib-sensitivity-target", lambda t, b: [*C, "--sensitivity", "--sensitivity-target", "tflite"], 2),
    ("calib-layers-0", lambda t, b: [*C, "--layers", "0"], 2),
    # build
    ("build-config-missing", lambda t, b: ["build", "nope.toml", "--out", "bout"], 2),
    ("build-config-is-dir", lambda t, b: ["build", str(t), "--out", "bout"], 2),
    ("build-config-not-toml", lambda t, b: ["build", write(t, "b.toml", "[[[ nope"), "--out", "bout"], 2),
    ("build-unknown-target", lambda t, b: ["build", write(t, "b.toml", ART.replace("ort", "tflite")), "--out", "bout"], 2),
    ("build-unsupported-recipe", lambda t, b: ["build", write(t, "b.toml", ART.replace("fp32", "fp16")), "--out", "bout"], 2),
    ("build-unknown-recipe", lambda t, b: ["build", write(t, "b.toml", ART.replace("fp32", "int3")), "--out", "bout"], 2),
    ("build-artifact-no-target", lambda t, b: ["build", write(t, "b.toml", '[[artifact]]\nrecipe = "fp32"\n'), "--out", "bout"], 2),
    ("build-no-artifacts", lambda t, b: ["build", write(t, "b.toml", '[model]\npreset = "tiny"\n'), "--out", "bout"], 2),
    ("build-unknown-key", lambda t, b: ["build", write(t, "b.toml", 'colour = "red"\n'), "--out", "bout"], 2),
    ("build-missing-manifest", lambda t, b: ["build", write(t, "b.toml", ART + '[calibration]\nmanifest = "nope.jsonl"\n'), "--out", "bout"], 2),
    ("build-bad-manifest-line", lambda t, b: ["build", write(t, "b.toml", ART + f'[calibration]\nmanifest = "{manifest(t, ["{bad"])}"\n'), "--out", "bout"], 2),
    ("build-bad-parity-inputs", lambda t, b: ["build", write(t, "b.toml", ART + f'[parity]\ninputs = "{manifest(t, ["[1]"])}"\n'), "--out", "bout"], 2),
    ("build-unknown-preset", lambda t, b: ["build", write(t, "b.toml", ART + '[model]\npreset = "huge"\n'), "--out", "bout"], 2),
    ("build-out-is-file", lambda t, b: ["build", "--out", write(t, "bout", "mine")], 2),
    ("build-out-user-dir", lambda t, b: (write(t, "bout/thesis.txt", "x") and ["build", "--out", "bout"]), 2),
    # info
    ("info-unknown-preset", lambda t, b: ["info", "--preset", "nope"], 2),
    ("info-layers-0", lambda t, b: ["info", "--layers", "0"], 2),
    ("info-checkpoint-missing", lambda t, b: ["info", "--checkpoint", "nope"], 2),
    ("info-checkpoint-heads-0", lambda t, b: ["info", "--checkpoint", ck(t, b, tc(num_attention_heads=0))], 2),
    # command line itself
    ("cli-unknown-command", lambda t, b: ["frobnicate"], 2),
    ("cli-unknown-option", lambda t, b: ["generate", "--prompt", "hi", "--colour", "red"], 2),
    ("cli-missing-required", lambda t, b: ["export", "--target", "ort"], 2),
]


def _snapshot(root: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns if p.is_file() else 0)
                  for p in root.rglob("*"))


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, base, tmp_path):
    name, argv_of, code = case
    work = tmp_path / "work"
    work.mkdir()
    old = os.getcwd()
    os.chdir(work)
    try:
        argv = argv_of(work, base)
        before = _snapshot(work)
        r = CliRunner().invoke(app, argv)
    finally:
        os.chdir(old)
    out = r.output
    assert r.exit_code == code, f"{name}: exit {r.exit_code}\n{out}\n{r.exception!r}"
    assert "Traceback" not in out, out
    lines = [l for l in out.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    assert _snapshot(work) == before, f"{name} changed the working directory"


def _cli(args, cwd, **kw):
    import subprocess
    import sys

    code = "import sys; from cli import app; sys.argv = ['autoglm-export'] + sys.argv[1:]; app()"
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, **kw)


@pytest.mark.slow
def test_kill_9_mid_export_then_rerun(tmp_path):
    """SIGKILL leaves only staging dirs beside --out (never a half artifact); the next run removes them."""
    import signal
    import time

    p = _cli(["export", "--target", "ort", "--recipe", "fp32", "--out", "art"], tmp_path)
    deadline = time.time() + 300
    while time.time() < deadline and not list(tmp_path.glob(".art.partial-*/*")):
        time.sleep(0.05)
    assert list(tmp_path.glob(".art.partial-*")), "the export never started writing"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (tmp_path / "art").exists()
    p = _cli(["export", "--target", "ort", "--recipe", "fp32", "--out", "art"], tmp_path)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    assert sorted(x.name for x in tmp_path.iterdir()) == ["art"]


@pytest.mark.slow
def test_disk_full_during_export(tmp_path):
    """A write that fails for lack of space (RLIMIT_FSIZE: EFBIG, as ENOSPC would) is one line, exit 3, nothing left."""
    import resource
    import signal

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    p = _cli(["export", "--target", "ort", "--recipe", "fp32", "--out", "art"], tmp_path, preexec_fn=small_files)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 3, err
    lines = [l for l in err.replace("\r", "\n").splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err and "disk space" in lines[0], err
    assert sorted(x.name for x in tmp_path.iterdir()) == []


def test_catalogue_is_at_least_125_inputs():
    assert len(CASES) + 2 >= 125  # + the kill -9 and the full disk above
