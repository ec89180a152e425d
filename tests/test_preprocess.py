"""Preprocessing (the one source shared by runner and calibration), the tiny tokenizer, the shipped data."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import wavfile

from core import preprocess as pp
from core.dataset import DATA_DIR, calibration_manifest, heldout_manifest, sample_inputs
from core.errors import InputFileError
from exporter.model.config import PRESETS, TINY_SPECIALS

REPO = Path(__file__).resolve().parents[1]
MEAN = PRESETS["tiny"].vision.image_mean
STD = PRESETS["tiny"].vision.image_std


def _items(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_pcm(path: Path, samples: np.ndarray, sr: int, width: int) -> None:
    """A PCM WAV with the stdlib writer (it supports 24-bit, scipy does not). samples: [n] or [n, ch] in [-1, 1)."""
    a = samples if samples.ndim == 2 else samples[:, None]
    if width == 1:
        ints = np.round(a * 128 + 128).clip(0, 255).astype("<u1")
        raw = ints.tobytes()
    else:
        full = np.round(a * 2 ** (8 * width - 1)).clip(-(2 ** (8 * width - 1)), 2 ** (8 * width - 1) - 1).astype("<i4")
        raw = full.astype("<i4").view("u1").reshape(*full.shape, 4)[..., :width].tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(a.shape[1])
        w.setsampwidth(width)
        w.setframerate(sr)
        w.writeframes(raw)


def _dominant_hz(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spec) * sr / len(x))


# --- images ------------------------------------------------------------------------


def test_constant_colour_image_normalises_to_known_values():
    rgb = np.zeros((30, 40, 3), np.uint8)
    rgb[:] = (255, 0, 128)
    px = pp.image_to_pixels(rgb, 112, MEAN, STD)
    assert px.shape == (1, 3, 112, 112) and px.dtype == np.float32
    expected = [(1.0 - 0.48145466) / 0.26862954, (0.0 - 0.4578275) / 0.26130258, (128 / 255 - 0.40821073) / 0.27577711]
    np.testing.assert_allclose(px[0, :, 57, 13], expected, atol=1e-6)
    np.testing.assert_allclose(px[0].reshape(3, -1).std(axis=1), 0, atol=1e-6)  # bicubic keeps a flat image flat
    assert px[0, 0, 0, 0] == pytest.approx(1.9303361, abs=1e-6)


def test_file_pil_and_array_inputs_give_identical_pixels(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    a = pp.image_to_pixels(rgb, 56, MEAN, STD)
    b = pp.image_to_pixels(Image.fromarray(rgb), 56, MEAN, STD)
    c = pp.image_to_pixels(tmp_path / "x.png", 56, MEAN, STD)
    d = pp.image_to_pixels(str(tmp_path / "x.png"), 56, MEAN, STD)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(a, d)
    # the resize is PIL bicubic on uint8, then /255 and per-channel normalisation
    resized = np.asarray(Image.fromarray(rgb).resize((56, 56), Image.BICUBIC), np.float32) / 255
    np.testing.assert_allclose(a[0].transpose(1, 2, 0), (resized - np.float32(MEAN)) / np.float32(STD), atol=1e-6)


def test_grayscale_and_rgba_images_become_three_channels(tmp_path):
    gray = np.full((20, 20), 200, np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.jpg")
    px = pp.image_to_pixels(tmp_path / "g.jpg", 28, MEAN, STD)
    assert px.shape == (1, 3, 28, 28)
    np.testing.assert_array_equal(px, pp.image_to_pixels(np.full((20, 20, 3), 200, np.uint8), 28, MEAN, STD))
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[:] = (10, 20, 30, 0)  # alpha is dropped, not composited
    without_alpha = pp.image_to_pixels(rgba[..., :3], 28, MEAN, STD)
    np.testing.assert_array_equal(pp.image_to_pixels(rgba, 28, MEAN, STD), without_alpha)


def test_corrupt_image_raises_input_file_error_naming_the_file(tmp_path):
    bad = tmp_path / "garbage.jpg"
    bad.write_bytes(b"this is not a jpeg at all")
    with pytest.raises(InputFileError, match=r"garbage\.jpg: cannot decode image"):
        pp.load_image(bad)
    real = (DATA_DIR / "heldout" / "rocket.jpg").read_bytes()
    cut = tmp_path / "truncated.jpg"
    cut.write_bytes(real[: len(real) // 2])
    with pytest.raises(InputFileError, match=r"truncated\.jpg: cannot decode image"):
        pp.image_to_pixels(cut, 112, MEAN, STD)


def test_missing_files_raise_input_file_error_naming_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(InputFileError, match=r"nope\.png: cannot decode image: no such file"):
        pp.load_image(str(missing) + ".png")
    with pytest.raises(InputFileError, match=r"nope\.wav: cannot decode audio: no such file"):
        pp.load_audio(str(missing) + ".wav")
    with pytest.raises(InputFileError, match=r"nope\.json: tokenizer file not found"):
        pp.load_tokenizer(str(missing) + ".json")


# --- audio -------------------------------------------------------------------------


def test_stereo_44k1_is_averaged_to_mono_16k(tmp_path):
    sr, n = 44100, 44100  # 1 s
    t = np.arange(n) / sr
    left, right = 0.5 * np.sin(2 * np.pi * 440 * t), 0.1 * np.sin(2 * np.pi * 440 * t)
    wavfile.write(tmp_path / "st.wav", sr, (np.stack([left, right], 1) * 32767).astype(np.int16))
    mono = pp.load_audio(tmp_path / "st.wav")
    assert mono.dtype == np.float32 and mono.ndim == 1
    assert len(mono) == math.ceil(n * 160 / 441) == 16000
    assert _dominant_hz(mono, 16000) == pytest.approx(440, abs=2)
    t16 = np.arange(len(mono)) / 16000
    np.testing.assert_allclose(mono[200:-200], 0.3 * np.sin(2 * np.pi * 440 * t16)[200:-200], atol=2e-3)


def test_8k_audio_is_resampled_to_16k_keeping_pitch(tmp_path):
    t = np.arange(8000) / 8000
    wavfile.write(tmp_path / "n.wav", 8000, (0.4 * np.sin(2 * np.pi * 1000 * t) * 32767).astype(np.int16))
    w = pp.load_audio(tmp_path / "n.wav")
    assert len(w) == 16000
    t16 = np.arange(16000) / 16000
    np.testing.assert_allclose(w[100:-100], 0.4 * np.sin(2 * np.pi * 1000 * t16)[100:-100], atol=2e-3)


@pytest.mark.parametrize("width, tol", [(1, 5e-3), (2, 2e-5), (3, 1e-6), (4, 1e-6)])
def test_pcm_bit_depths_decode_to_the_same_wave(tmp_path, width, tol):
    x = 0.6 * np.sin(2 * np.pi * 300 * np.arange(1600) / 16000)
    _write_pcm(tmp_path / "p.wav", x, 16000, width)
    np.testing.assert_allclose(pp.load_audio(tmp_path / "p.wav"), x, atol=tol)


def test_float_wav_is_read_and_clipped_to_unit_range(tmp_path):
    x = np.array([0.0, 0.5, -0.25, 1.5, -3.0] * 100, np.float32)
    wavfile.write(tmp_path / "f.wav", 16000, x)
    np.testing.assert_array_equal(pp.load_audio(tmp_path / "f.wav"), np.clip(x, -1, 1))


def test_empty_or_undecodable_audio_raises_naming_the_file(tmp_path):
    _write_pcm(tmp_path / "empty.wav", np.zeros(0), 16000, 2)
    with pytest.raises(InputFileError, match=r"empty\.wav: audio has no samples"):
        pp.load_audio(tmp_path / "empty.wav")
    (tmp_path / "junk.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunk")
    with pytest.raises(InputFileError, match=r"junk\.wav: cannot decode audio"):
        pp.load_audio(tmp_path / "junk.wav")
    with pytest.raises(InputFileError, match=r"junk\.wav: cannot decode audio"):
        pp.audio_to_mel(tmp_path / "junk.wav", 80, 200)


# --- log-mel -----------------------------------------------------------------------


def _whisper_log_mel_torch(wave: np.ndarray, n_mels: int, frames: int) -> np.ndarray:
    """openai/whisper's log_mel_spectrogram (torch.stft), on the waveform padded/trimmed to frames*160."""
    import torch

    n = frames * 160
    x = torch.from_numpy(np.pad(wave, (0, max(0, n - len(wave))))[:n].astype(np.float32))
    stft = torch.stft(x, 400, 160, window=torch.hann_window(400), return_complex=True)
    magnitudes = stft[..., :-1].abs() ** 2
    mel_spec = torch.from_numpy(np.array(pp.mel_filters(n_mels))) @ magnitudes
    log_spec = torch.clamp(mel_spec, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0)[None].numpy()


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return pp.load_audio(DATA_DIR / "heldout" / "austen_0930.wav")


def test_log_mel_shape_pads_and_trims_to_the_frame_count(speech):
    assert len(speech) > 200 * 160  # longer than 2 s: trimmed
    m = pp.log_mel(speech, 80, 200)
    assert m.shape == (1, 80, 200) and m.dtype == np.float32
    np.testing.assert_array_equal(m, pp.log_mel(speech[: 200 * 160], 80, 200))
    short = pp.log_mel(speech[:8000], 80, 200)  # 0.5 s: zero-padded, padding hits the -8 floor
    assert short.shape == (1, 80, 200)
    assert short.max() - short.min() == pytest.approx(2.0, abs=1e-6)
    np.testing.assert_allclose(short[0, :, -1], short.max() - 2.0, atol=1e-6)
    assert pp.audio_to_mel(DATA_DIR / "heldout" / "austen_0930.wav", 80, 200).tolist() == m.tolist()


@pytest.mark.parametrize("n_mels, frames", [(80, 3000), (80, 200), (128, 400)])
def test_log_mel_matches_whisper_torch_stft_reference(speech, n_mels, frames):
    ours = pp.log_mel(speech, n_mels, frames)
    ref = _whisper_log_mel_torch(speech, n_mels, frames)
    assert ours.shape == ref.shape == (1, n_mels, frames)
    assert np.abs(ours - ref).max() <= 1e-4


def test_log_mel_matches_transformers_whisper_feature_extractor(speech):
    transformers = pytest.importorskip("transformers")
    fe = transformers.WhisperFeatureExtractor(feature_size=80)
    ref = fe(speech, sampling_rate=16000, return_tensors="np")["input_features"]
    ours = pp.log_mel(speech, 80, 3000)
    assert ref.shape == ours.shape
    assert np.abs(ours - ref).max() <= 1e-4
    for n_mels in (80, 128):  # an independent implementation of the same Slaney bank
        bank = transformers.WhisperFeatureExtractor(feature_size=n_mels).mel_filters.T
        np.testing.assert_allclose(pp.mel_filters(n_mels), bank, atol=1e-7)


def test_mel_filterbank_is_slaney_triangles_with_unit_area():
    bank = pp.mel_filters(80).astype(np.float64)
    assert bank.shape == (80, 201) and (bank >= 0).all()
    bins_hz = np.linspace(0, 8000, 201)
    # the Slaney scale: linear (66.67 Hz per mel) below 1 kHz, log above; corner i+1 is filter i's peak
    mels = np.linspace(0, pp._hz_to_mel(np.array(8000.0)), 82)
    corners = pp._mel_to_hz(mels)
    assert corners[-1] == pytest.approx(8000) and pp._hz_to_mel(np.array(1000.0)) == pytest.approx(15.0)
    np.testing.assert_allclose(pp._mel_to_hz(pp._hz_to_mel(np.array([123.0, 999.0, 4321.0]))), [123, 999, 4321])
    for i, row in enumerate(bank):
        lo, peak, hi = corners[i], corners[i + 1], corners[i + 2]
        support = bins_hz[row > 0]
        assert support.min() > lo - 1e-9 and support.max() < hi + 1e-9
        assert abs(bins_hz[row.argmax()] - peak) <= 20.0  # within half a bin (40 Hz) of the apex
        height = 2.0 / (hi - lo)  # Slaney norm: a triangle of unit area in Hz
        assert row.max() <= height * (1 + 1e-6)
        rising = (bins_hz > lo) & (bins_hz <= peak)
        np.testing.assert_allclose(row[rising], height * (bins_hz[rising] - lo) / (peak - lo), rtol=1e-5)
        if len(support) >= 8:  # wide enough for a Riemann sum to estimate the area
            assert row.sum() * 40.0 == pytest.approx(1.0, rel=0.03)


# --- tokenizer ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return pp.load_tokenizer("builtin:tiny")


def test_tiny_tokenizer_special_ids_and_vocab_size(tok):
    assert [tok.token_to_id(s) for s in TINY_SPECIALS] == list(range(13))
    assert tok.token_to_id("<|image|>") == 8
    assert tok.get_vocab_size() == 2048 == PRESETS["tiny"].text.vocab_size
    ids = tok.encode("<|user|>\n<|begin_of_image|><|image|><|end_of_image|>hi", add_special_tokens=False).ids
    assert ids[:1] == [4] and ids[2:5] == [6, 8, 7]


@pytest.mark.parametrize(
    "text",
    [
        "Open the settings app and turn on Wi-Fi.",
        "Send «bonne nuit» to Élodie — ça va? 😀👍🏽",
        "打开相机，拍一张照片。 東京の天気は？ 날씨 어때?",
        "مرحبا بالعالم  Привет, мир\tnaïve café\u0301 \u200b\r\n",
        "  leading and trailing spaces  \n\n",
    ],
)
def test_tiny_tokenizer_round_trips_any_unicode(tok, text):
    ids = tok.encode(text, add_special_tokens=False).ids
    assert max(ids) < 2048
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_tiny_tokenizer_compresses_the_projects_english(tok):
    text = "Open the calendar and add a meeting at three o'clock, then send a message to the team."
    assert len(tok.encode(text, add_special_tokens=False).ids) < len(text) / 2.5


def test_retraining_reproduces_the_shipped_tiny_tokenizer():
    shipped = json.loads(pp.tokenizer_file("builtin:tiny").read_text(encoding="utf-8"))
    retrained = json.loads(pp.train_tiny_tokenizer(pp.tiny_tokenizer_texts()).to_str())
    assert retrained["model"]["vocab"] == shipped["model"]["vocab"]
    assert retrained["model"]["merges"] == shipped["model"]["merges"]
    assert retrained["added_tokens"] == shipped["added_tokens"]


def test_tokenizer_file_resolves_builtin_and_directories(tmp_path):
    builtin = pp.tokenizer_file("builtin:tiny")
    assert builtin.name == "tiny_tokenizer.json" and builtin.parent == REPO / "exporter" / "model"
    (tmp_path / "tokenizer.json").write_text(builtin.read_text(encoding="utf-8"), encoding="utf-8")
    assert pp.tokenizer_file(tmp_path) == tmp_path / "tokenizer.json"
    assert pp.load_tokenizer(tmp_path).get_vocab_size() == 2048


def test_corrupt_tokenizer_raises_input_file_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": 1}')
    with pytest.raises(InputFileError, match=r"tokenizer\.json: cannot load tokenizer"):
        pp.load_tokenizer(tmp_path / "tokenizer.json")


def test_preprocessing_never_imports_torch():
    code = (
        "import sys\n"
        "from core import preprocess as pp, dataset\n"
        "s = dataset.sample_inputs()\n"
        "pp.load_tokenizer('builtin:tiny').encode(s['prompt'])\n"
        "pp.image_to_pixels(s['image'], 112, (0.5,) * 3, (0.5,) * 3)\n"
        "pp.audio_to_mel(s['audio'], 80, 200)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# --- shipped data ------------------------------------------------------------------


@pytest.fixture(scope="module")
def sets() -> dict[str, list[dict]]:
    return {"calib": _items(calibration_manifest()), "heldout": _items(heldout_manifest())}


def _kinds(items: list[dict]) -> dict[str, int]:
    kinds = {"text": 0, "image": 0, "audio": 0, "image+audio": 0}
    for it in items:
        kinds["image+audio" if "image" in it and "audio" in it else "image" if "image" in it else
              "audio" if "audio" in it else "text"] += 1
    return kinds


def test_shipped_sets_are_big_enough_and_mix_modalities(sets):
    assert len(sets["calib"]) >= 48 and len(sets["heldout"]) >= 12
    for items in sets.values():
        assert all(n >= 2 for n in _kinds(items).values()), _kinds(items)
        assert all(set(it) <= {"id", "text", "image", "audio"} and it["text"].strip() for it in items)
        assert len({it["id"] for it in items}) == len(items)


def test_every_shipped_sample_decodes(sets):
    for name, items in sets.items():
        folder = calibration_manifest().parent
        for it in items:
            if "image" in it:
                assert pp.image_to_pixels(folder / it["image"], 112, MEAN, STD).shape == (1, 3, 112, 112)
            if "audio" in it:
                w = pp.load_audio(folder / it["audio"])
                assert 0.5 * 16000 <= len(w) <= 4.0 * 16000 and np.abs(w).max() > 0.1, it["audio"]


def test_calibration_and_heldout_share_no_file_or_prompt(sets):
    folder = calibration_manifest().parent

    def files(items):
        return {folder / it[k] for it in items for k in ("image", "audio") if k in it}

    calib_files, held_files = files(sets["calib"]), files(sets["heldout"])
    assert not calib_files & held_files
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert not {digest(p) for p in calib_files} & {digest(p) for p in held_files}
    assert all(p.parent.name == "calib" for p in calib_files) and all(p.parent.name == "heldout" for p in held_files)
    prompts = lambda items: {" ".join(it["text"].lower().split()) for it in items}  # noqa: E731
    assert not prompts(sets["calib"]) & prompts(sets["heldout"])
    assert len(prompts(sets["calib"])) == len(sets["calib"]) and len(prompts(sets["heldout"])) == len(sets["heldout"])
    assert not {it["id"] for it in sets["calib"]} & {it["id"] for it in sets["heldout"]}


def test_every_shipped_media_file_is_used_by_its_manifest(sets):
    folder = calibration_manifest().parent
    for name, items in sets.items():
        used = {it[k] for it in items for k in ("image", "audio") if k in it}
        on_disk = {f"{name}/{p.name}" for p in (folder / name).iterdir()}
        assert used == on_disk


def test_calibration_audio_exercises_resampling_and_downmix(sets):
    folder = calibration_manifest().parent
    formats = set()
    for it in sets["calib"]:
        if "audio" in it:
            rate, data = wavfile.read(folder / it["audio"])
            formats.add((rate, 1 if data.ndim == 1 else data.shape[1]))
    assert (44100, 2) in formats and (8000, 1) in formats and (16000, 1) in formats


def test_sources_md_lists_every_shipped_data_file():
    text = (DATA_DIR / "SOURCES.md").read_text(encoding="utf-8")
    shipped = [p.relative_to(DATA_DIR).as_posix() for p in DATA_DIR.rglob("*") if p.is_file()]
    shipped = [p for p in shipped if p != "SOURCES.md" and "__pycache__" not in p]
    assert len(shipped) > 50
    missing = [p for p in shipped if f"`{p}`" not in text]
    assert not missing, f"not in SOURCES.md: {missing}"


def test_sample_inputs_come_from_the_heldout_set(sets):
    s = sample_inputs()
    assert s["image"].is_file() and s["audio"].is_file()
    folder = heldout_manifest().parent
    held = {folder / it[k] for it in sets["heldout"] for k in ("image", "audio") if k in it}
    assert {s["image"], s["audio"]} <= held
    assert s["prompt"] in {it["text"] for it in sets["heldout"]}
    # the README demo's inputs are those same held-out files
    assert (REPO / "examples" / "inputs" / "photo.jpg").read_bytes() == s["image"].read_bytes()
    assert (REPO / "examples" / "inputs" / "speech.wav").read_bytes() == s["audio"].read_bytes()
