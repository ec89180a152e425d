"""The one source of preprocessing: tokenizer, image -> pixels, audio file -> 16 kHz -> log-mel.

The host runner (``exporter/runner.py``) and calibration (``calibration/stats.py``)
both call these functions, so an artifact is calibrated and checked on exactly
the inputs it sees at run time. numpy, Pillow, scipy and tokenizers only:
torch is never imported here (``train_tiny_tokenizer`` reads the preset's
special tokens from ``exporter.model.config``, a development step).

``python -m core.preprocess --retrain-tiny-tokenizer`` rebuilds
``exporter/model/tiny_tokenizer.json`` from the text shipped in
``calibration/data`` (BPE training is deterministic, so the file is
reproduced exactly).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from core.errors import BadInputError, ConfigError, InputFileError

# Bump whenever any function below changes its output for the same input:
# cached calibration statistics are keyed on it.
PREPROCESS_VERSION = "1"

BUILTIN_TINY = "builtin:tiny"
SAMPLE_RATE = 16000  # Whisper's rate: every waveform is resampled to it
N_FFT = 400  # 25 ms window
HOP_LENGTH = 160  # 10 ms hop: one log-mel frame per 160 samples


# --- tokenizer ---------------------------------------------------------------------


def tokenizer_file(path: str | Path) -> Path:
    """The tokenizer.json a tokenizer source names: ``builtin:tiny``, a file, or a directory holding one."""
    if str(path) == BUILTIN_TINY:
        # find_spec locates the package folder without running exporter/model/__init__.py (torch).
        spec = importlib.util.find_spec("exporter.model")
        if spec is None or not spec.submodule_search_locations:
            raise InputFileError("builtin:tiny: the exporter.model package is not importable; reinstall autoglm-export")
        return Path(next(iter(spec.submodule_search_locations))) / "tiny_tokenizer.json"
    p = Path(path)
    return p / "tokenizer.json" if p.is_dir() else p


def load_tokenizer(path: str | Path):
    """A ``tokenizers.Tokenizer`` from a tokenizer.json (or ``builtin:tiny``)."""
    from tokenizers import Tokenizer

    file = tokenizer_file(path)
    if not file.is_file():
        hint = " (package data missing: reinstall autoglm-export)" if str(path) == BUILTIN_TINY else ""
        raise InputFileError(f"{file}: tokenizer file not found{hint}")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on a bad file
        raise InputFileError(f"{file}: cannot load tokenizer: {e}") from e


def train_tiny_tokenizer(texts: list[str]):
    """Train the tiny preset's byte-level BPE: the preset's vocab size, special tokens owning ids 0..12."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from exporter.model.config import PRESETS, TINY_SPECIALS

    vocab_size = PRESETS["tiny"].text.vocab_size
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(TINY_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    got = [tok.token_to_id(s) for s in TINY_SPECIALS]
    if got != list(range(len(TINY_SPECIALS))):
        raise ConfigError(f"tiny tokenizer: special tokens got ids {got}, expected 0..{len(TINY_SPECIALS) - 1}")
    if tok.get_vocab_size() != vocab_size:
        raise ConfigError(
            f"tiny tokenizer: training text yields {tok.get_vocab_size()} tokens, the preset needs {vocab_size}; "
            "add text to calibration/data/tokenizer_corpus.txt"
        )
    return tok


def tiny_tokenizer_texts() -> list[str]:
    """The shipped text the tiny tokenizer is trained on: every manifest prompt, then the corpus file."""
    from core.dataset import calibration_manifest, heldout_manifest, tokenizer_corpus

    texts: list[str] = []
    for manifest in (calibration_manifest(), heldout_manifest()):
        for line in manifest.read_text(encoding="utf-8").splitlines():
            if line.strip():
                texts.append(json.loads(line).get("text", ""))
    corpus = tokenizer_corpus().read_text(encoding="utf-8")
    texts.extend(p for p in corpus.split("\n\n") if p.strip())
    return texts


# --- images ------------------------------------------------------------------------


def load_image(path: str | Path) -> Image.Image:
    """An image file decoded to RGB."""
    p = Path(path)
    if not p.is_file():
        raise InputFileError(f"{p}: cannot decode image: no such file")
    try:
        with Image.open(p) as im:
            im.load()
            return im.convert("RGB")
    except Exception as e:  # Pillow raises many types on a corrupt file (OSError, SyntaxError, ValueError, ...)
        raise InputFileError(f"{p}: cannot decode image: {e}") from e


def _array_to_image(a: np.ndarray) -> Image.Image:
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)):
        raise BadInputError(
            f"image array must be uint8 [H,W] or [H,W,C] with C in 1/3/4, got {a.dtype} {list(a.shape)}"
        )
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    return Image.fromarray(np.ascontiguousarray(a)).convert("RGB")


def image_to_pixels(
    image: Image.Image | np.ndarray | str | Path,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> np.ndarray:
    """Normalised pixels float32 [1, 3, size, size]: RGB, bicubic resize, /255, (x - mean) / std per channel."""
    if isinstance(image, (str, Path)):
        img = load_image(image)
    elif isinstance(image, np.ndarray):
        img = _array_to_image(image)
    elif isinstance(image, Image.Image):
        img = image.convert("RGB")
    else:
        raise BadInputError(f"image must be a file path, a PIL image or a uint8 array, got {type(image).__name__}")
    img = img.resize((size, size), Image.Resampling.BICUBIC)
    x = np.asarray(img, dtype=np.float32) / np.float32(255.0)  # [S, S, 3]
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)


# --- audio -------------------------------------------------------------------------


def _int_to_float(data: np.ndarray) -> np.ndarray:
    """WAV samples to float64 in [-1, 1): unsigned 8-bit is offset, wider PCM is left-justified signed."""
    if data.dtype == np.uint8:
        return (data.astype(np.float64) - 128.0) / 128.0
    if np.issubdtype(data.dtype, np.signedinteger):
        return data.astype(np.float64) / float(np.iinfo(data.dtype).max + 1)
    return data.astype(np.float64)


def _read_wav(p: Path) -> tuple[np.ndarray, int]:
    try:
        import soundfile
    except ImportError:  # soundfile is optional: scipy reads every WAV we ship
        soundfile = None
    try:
        if soundfile is not None:
            data, sr = soundfile.read(str(p), dtype="float64", always_2d=False)
            return np.asarray(data), int(sr)
        from scipy.io import wavfile

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", wavfile.WavFileWarning)  # unknown chunks (LIST, ...) are harmless
            sr, data = wavfile.read(p)
        return _int_to_float(np.asarray(data)), int(sr)
    except Exception as e:  # decoders raise ValueError, RuntimeError, EOFError, struct.error, ...
        raise InputFileError(f"{p}: cannot decode audio: {e} (expected a PCM or float WAV file)") from e


def resample(wave: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Polyphase resampling by the exact rational factor target_sr / orig_sr."""
    if orig_sr == target_sr:
        return wave
    from scipy.signal import resample_poly

    g = math.gcd(int(orig_sr), int(target_sr))
    return resample_poly(wave, target_sr // g, orig_sr // g)


def load_audio(path: str | Path, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """A WAV file as float32 mono in [-1, 1] at ``target_sr``: channels averaged, resampled polyphase."""
    p = Path(path)
    if not p.is_file():
        raise InputFileError(f"{p}: cannot decode audio: no such file")
    wave, sr = _read_wav(p)
    if sr <= 0:
        raise InputFileError(f"{p}: cannot decode audio: sample rate {sr} Hz")
    if wave.ndim == 2:  # [samples, channels]
        wave = wave.mean(axis=1)
    if wave.size == 0:
        raise InputFileError(f"{p}: audio has no samples")
    if not np.all(np.isfinite(wave)):
        raise InputFileError(f"{p}: audio has NaN or infinite samples")
    wave = resample(wave, sr, target_sr)
    return np.clip(wave, -1.0, 1.0).astype(np.float32)


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale (librosa htk=False): linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(
        f >= min_log_hz, min_log_mel + np.log(np.maximum(f, min_log_hz) / min_log_hz) / logstep, f / f_sp
    )


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


@functools.lru_cache(maxsize=8)
def mel_filters(
    n_mels: int = 80, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, fmin: float = 0.0, fmax: float | None = None
) -> np.ndarray:
    """Slaney-normalised triangular mel filterbank float32 [n_mels, 1 + n_fft // 2].

    Equals librosa's ``filters.mel(sr, n_fft, n_mels, fmin, fmax, htk=False, norm="slaney")``,
    the bank Whisper ships in ``mel_filters.npz``.
    """
    fmax = sample_rate / 2 if fmax is None else fmax
    fft_freqs = np.linspace(0.0, sample_rate / 2, 1 + n_fft // 2)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fft_freqs)  # [n_mels + 2, bins]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]  # each triangle has unit area in Hz
    weights = weights.astype(np.float32)
    weights.setflags(write=False)
    return weights


def _stft_power(wave: np.ndarray) -> np.ndarray:
    """|STFT|^2 [1 + N_FFT // 2, 1 + len // HOP_LENGTH] as torch.stft(center=True, pad_mode="reflect")."""
    # wave: [samples]
    x = np.pad(wave.astype(np.float64), N_FFT // 2, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic Hann
    n_frames = 1 + (len(x) - N_FFT) // HOP_LENGTH
    frames = np.lib.stride_tricks.sliding_window_view(x, N_FFT)[::HOP_LENGTH][:n_frames]
    spec = np.fft.rfft(frames * window, axis=-1)
    return (spec.real**2 + spec.imag**2).T


def log_mel(wave: np.ndarray, n_mels: int = 80, frames: int = 3000) -> np.ndarray:
    """Whisper's log-mel spectrogram float32 [1, n_mels, frames] of a 16 kHz waveform.

    The waveform is zero-padded or trimmed to ``frames * 160`` samples first, so
    the result always has exactly ``frames`` frames (the artifact's static shape).
    """
    wave = np.asarray(wave)
    if wave.ndim == 2 and wave.shape[0] == 1:
        wave = wave[0]
    if wave.ndim != 1:
        raise BadInputError(f"log_mel expects a mono waveform [samples], got shape {list(wave.shape)}")
    if frames < 1 or n_mels < 1:
        raise BadInputError(f"log_mel needs frames >= 1 and n_mels >= 1, got frames={frames} n_mels={n_mels}")
    n = frames * HOP_LENGTH
    wave = wave[:n] if len(wave) >= n else np.pad(wave, (0, n - len(wave)))
    power = _stft_power(wave)[:, :-1]  # [bins, frames]
    mel = mel_filters(n_mels).astype(np.float64) @ power
    log = np.log10(np.maximum(mel, 1e-10))
    log = np.maximum(log, log.max() - 8.0)
    return ((log + 4.0) / 4.0).astype(np.float32)[None]


def audio_to_mel(path_or_wave: str | Path | np.ndarray, n_mels: int = 80, frames: int = 3000) -> np.ndarray:
    """log-mel [1, n_mels, frames] of a WAV file, or of a 16 kHz float waveform."""
    if isinstance(path_or_wave, np.ndarray):
        wave = path_or_wave.astype(np.float32)
    else:
        wave = load_audio(path_or_wave)
    return log_mel(wave, n_mels, frames)


# --- development entry point -------------------------------------------------------


def _write_atomic(text: str, dest: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.preprocess", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--retrain-tiny-tokenizer",
        action="store_true",
        help="rewrite exporter/model/tiny_tokenizer.json from the text shipped in calibration/data",
    )
    args = parser.parse_args(argv)
    if not args.retrain_tiny_tokenizer:
        parser.print_help()
        return 2
    texts = tiny_tokenizer_texts()
    tok = train_tiny_tokenizer(texts)
    dest = tokenizer_file(BUILTIN_TINY)
    _write_atomic(tok.to_str(pretty=True) + "\n", dest)
    chars = sum(len(t) for t in texts)
    print(f"wrote {dest}: {tok.get_vocab_size()} tokens from {len(texts)} texts ({chars} characters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

