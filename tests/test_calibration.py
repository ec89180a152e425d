"""Calibration: manifest validation, the cached reference run, layer sensitivity, mixed-precision fallback."""

from __future__ import annotations

import json
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest

from core.dataset import calibration_manifest
from core.errors import ManifestError

OUTLIER_LAYER = "text.layers.0.self_attn.v_proj"


def _write_wav(path: Path, rate: int, channels: int, seconds: float = 0.25) -> None:
    n = int(rate * seconds)
    t = np.arange(n) / rate
    sig = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)
    data = np.stack([sig] * channels, axis=1) if channels > 1 else sig
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(data.tobytes())


@pytest.fixture(scope="module")
def small_manifest(tmp_path_factory) -> Path:
    """Three real shipped calibration samples (two text-only, one image + audio), absolute paths."""
    src = calibration_manifest()
    lines = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    pick = lines[:2] + [d for d in lines if d.get("image") and d.get("audio")][:1]
    for d in pick:
        for k in ("image", "audio"):
            if d.get(k):
                d[k] = str(src.parent / d[k])
    out = tmp_path_factory.mktemp("manifest") / "small.jsonl"
    out.write_text("\n".join(json.dumps(d) for d in pick) + "\n")
    return out


def test_builtin_manifest_is_valid():
    from calibration.manifest import read_manifest

    samples = read_manifest(calibration_manifest())
    assert len(samples) >= 20
    assert any(s.image for s in samples) and any(s.audio for s in samples)
    assert all(s.image is None or s.image.is_file() for s in samples)


def test_manifest_reports_every_bad_line(tmp_path):
    from calibration.manifest import read_manifest

    img_src = next(p for p in (calibration_manifest().parent / "calib").iterdir() if p.suffix == ".jpg")
    shutil.copy(img_src, tmp_path / "good.jpg")
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk")
    _write_wav(tmp_path / "stereo44k.wav", 44100, 2)
    lines = [
        json.dumps({"id": "ok-text", "text": "open the camera"}),  # 1 ok
        '{"text": "unterminated',  # 2 invalid JSON
        json.dumps({"text": "hi", "video": "a.mp4"}),  # 3 unknown key
        json.dumps({"text": "look", "image": "missing.png"}),  # 4 missing file
        json.dumps({"text": "look", "image": "corrupt.jpg"}),  # 5 corrupt image
        json.dumps({"text": "listen", "audio": "corrupt.wav"}),  # 6 audio that cannot be decoded
        json.dumps({"id": "empty"}),  # 7 empty sample
        "",  # blank lines are skipped
        json.dumps({"text": "both", "image": "good.jpg", "audio": "stereo44k.wav"}),  # 9 ok
        "[1, 2]",  # 10 not an object
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ManifestError) as e:
        read_manifest(path)
    got = dict(e.value.problems)
    assert sorted(got) == [2, 3, 4, 5, 6, 7, 10]
    assert "invalid JSON" in got[2]
    assert "unknown key" in got[3] and "video" in got[3]
    assert "not found" in got[4]
    assert "corrupt image" in got[5]
    assert "corrupt audio" in got[6]
    assert "empty sample" in got[7]
    assert "line 2:" in str(e.value) and "line 10:" in str(e.value)
    assert e.value.exit_code == 2

    # the good lines alone are accepted; 44.1 kHz stereo decodes to 16 kHz mono
    path.write_text(lines[0] + "\n" + lines[8] + "\n")
    samples = read_manifest(path)
    assert [s.id for s in samples] == ["ok-text", "line-2"]
    assert samples[1].image == tmp_path / "good.jpg"
    from core.preprocess import load_audio

    a = load_audio(samples[1].audio)
    assert a.ndim == 1 and abs(a.size - 4000) <= 1
    prompt = samples[1].to_prompt()
    assert prompt.text == "both" and Path(prompt.audio) == tmp_path / "stereo44k.wav"


@pytest.fixture(scope="module")
def outlier_model():
    """The tiny model with outliers planted in one layer's weights (its own copy: the shared one is untouched)."""
    import torch

    from core.components import build_components
    from exporter.model import build, get_preset

    model = build(get_preset("tiny"))
    w = dict(model.named_modules())[OUTLIER_LAYER].weight
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        cols = torch.randint(0, w.shape[1], (w.shape[0],), generator=g)
        w[torch.arange(w.shape[0]), cols] = w.abs().max() * 10
    return build_components(model)


@pytest.fixture(scope="module")
def calib(outlier_model, small_manifest, tmp_path_factory):
    from calibration.stats import calibrate
    from core.runner import load_tokenizer

    cache = tmp_path_factory.mktemp("cache")
    calls = []
    data = calibrate(
        outlier_model, small_manifest, load_tokenizer(outlier_model.config), cache_dir=cache,
        progress=lambda s, d, t: calls.append((s, d, t)),
    )
    return data, cache, calls


def test_calibrate_records_and_caches(calib, outlier_model, small_manifest, tmp_path):
    from calibration.stats import calibrate, load_calibration, save_calibration
    from core.runner import load_tokenizer

    data, cache, calls = calib
    assert not data.from_cache
    assert calls[-1] == ("calibration samples", 3, 3)
    assert {"token_embedding", "vision_encoder", "audio_encoder", "text_decoder"} <= set(data.method_inputs)
    dec = data.method_inputs["text_decoder"]
    assert len(dec) >= 3 * 5 and all("past" in c for c in dec)
    st = data.activation_stats[OUTLIER_LAYER]
    assert st["min"] <= st["p0.01"] <= st["p99.99"] <= st["max"]
    assert sum(st["hist"]["counts"]) > 0

    # second run: same weights + manifest -> cache hit, identical samples, no model calls
    tok = load_tokenizer(outlier_model.config)
    calls2 = []
    again = calibrate(outlier_model, small_manifest, tok, cache_dir=cache, progress=lambda s, d, t: calls2.append(s))
    assert again.from_cache and again.key == data.key
    assert "calibration samples" not in calls2
    for a, b in zip(dec, again.method_inputs["text_decoder"]):
        np.testing.assert_array_equal(a["embeds"], b["embeds"])
        assert len(a["past"]) == len(b["past"])
        for (ka, va), (kb, vb) in zip(a["past"], b["past"]):
            np.testing.assert_array_equal(ka, kb)
            np.testing.assert_array_equal(va, vb)

    # a changed manifest misses the cache
    changed = tmp_path / "changed.jsonl"
    changed.write_text(small_manifest.read_text().splitlines()[0] + "\n")
    other = calibrate(outlier_model, changed, tok, cache_dir=cache)
    assert not other.from_cache and other.key != data.key

    # calibrate --out DIR round trip
    lines = save_calibration(data, tmp_path / "out")
    assert data.key in lines[0]
    back = load_calibration(tmp_path / "out")
    assert back.key == data.key and back.activation_stats.keys() == data.activation_stats.keys()
    assert [len(v) for v in back.method_inputs.values()] == [len(v) for v in data.method_inputs.values()]


@pytest.fixture(scope="module")
def ranking(outlier_model, calib):
    from calibration.sensitivity import layer_sensitivity

    return layer_sensitivity(outlier_model, calib[0])


def test_sensitivity_ranks_outlier_layer_first(ranking, tmp_path):
    from calibration.sensitivity import write_sensitivity_report

    assert ranking[0][0] == OUTLIER_LAYER, ranking[:3]
    assert ranking[0][1] + 2.0 < ranking[1][1]  # clearly worse than the next layer
    sqnrs = [s for _, s in ranking]
    assert sqnrs == sorted(sqnrs)
    lines = write_sensitivity_report(ranking, tmp_path)
    report = json.loads((tmp_path / "sensitivity.json").read_text())
    assert report["layers"][0]["module"] == OUTLIER_LAYER and report["layers"][0]["rank"] == 1
    assert OUTLIER_LAYER in (tmp_path / "sensitivity.txt").read_text().splitlines()[1]
    assert "sensitivity.json" in lines[0]


@pytest.mark.slow
def test_mixed_precision_fallback_meets_target(outlier_model, calib, ranking):
    from calibration.sensitivity import choose_keep_float, parse_parity_target, quantized_cosine

    data = calib[0]
    all_int8 = min(quantized_cosine(outlier_model, data).values())
    target = parse_parity_target("cos=0.9995")
    assert all_int8 < target  # the target needs a fallback
    keep = choose_keep_float(outlier_model, data, ranking, target)
    assert keep and keep[0] == OUTLIER_LAYER
    assert min(quantized_cosine(outlier_model, data, keep).values()) >= target
    # greedy is minimal along the ranking: one fewer layer in float misses the target
    assert min(quantized_cosine(outlier_model, data, keep[:-1]).values()) < target


@pytest.mark.slow
def test_int8_weight_search_simulates_weights_only(outlier_model, calib, ranking, tmp_path):
    """int8-weight keeps activations float (ORT, Core ML): its search quantizes weights alone, so it needs no more float layers."""
    from calibration.sensitivity import (
        choose_keep_float, layer_sensitivity, quantized_cosine, write_sensitivity_report,
    )
    from targets import target_spec

    data = calib[0]
    # the search simulates each target's recipe through the scheme its spec declares (the one it builds with)
    sim = {t: {r: target_spec(t).recipe(r).scheme.simulation for r in ("int8-weight", "int8-static")}
           for t in ("ort", "coreml", "executorch")}
    assert [sim[t]["int8-weight"] for t in ("ort", "coreml", "executorch")] == ["w8", "w8", "w8da8"]
    assert {sim[t]["int8-static"] for t in sim} == {"w8a8"}
    w8 = layer_sensitivity(outlier_model, data, scheme="w8")
    assert w8[0][0] == OUTLIER_LAYER  # its outliers are in the weights
    # inputs left float: less error than weight + static input quantization (per layer up to cancellation)
    both = dict(ranking)
    assert float(np.median([s - both[n] for n, s in w8])) > 1.0
    w8_cos = min(quantized_cosine(outlier_model, data, scheme="w8").values())
    assert w8_cos > min(quantized_cosine(outlier_model, data).values())
    target = min(0.99999, 1 - (1 - w8_cos) / 4)  # needs a fallback under either scheme
    keep_w8 = choose_keep_float(outlier_model, data, w8, target, scheme="w8")
    keep_w8a8 = choose_keep_float(outlier_model, data, ranking, target)
    assert min(quantized_cosine(outlier_model, data, keep_w8, scheme="w8").values()) >= target
    assert 0 < len(keep_w8) <= len(keep_w8a8)
    write_sensitivity_report(w8, tmp_path, scheme="w8")
    report = json.loads((tmp_path / "sensitivity.json").read_text())
    assert report["scheme"] == "w8" and "float input" in report["metric"]


def test_dynamic_input_scheme_quantizes_each_row_by_its_own_range():
    """ExecuTorch's int8-weight (XNNPACK qd8): every row of a linear's input is int8 with its own scale and zero point."""
    import torch
    from torch import nn

    from calibration.sensitivity import fake_quantized

    torch.manual_seed(0)
    lin = nn.Linear(64, 8, bias=False)
    seen = []
    x = torch.randn(1, 5, 64) * torch.tensor([0.01, 0.1, 1.0, 10.0, 100.0]).view(1, 5, 1)  # rows of very different range
    with fake_quantized([("lin", lin)], {}, dynamic_inputs=True):
        spy = lin.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))  # runs after the quantizing hook
        lin(x)
    lin(x)  # outside the block: float again
    spy.remove()
    q, f = seen
    assert torch.equal(f, x)
    for row_q, row in zip(q[0], x[0]):
        step = float((row.max() - row.min()) / 255)
        assert len(torch.unique(row_q)) <= 256
        assert float((row_q - row).abs().max()) <= step * 0.51  # rounding error of that row's own step
        assert not torch.equal(row_q, row)
