"""The build: config validation, byte-identical rebuilds, skipping, thresholds, and an interrupted build."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exporter import build as builder
from heldout import heldout_subset
from core.errors import ConfigError, ParityFailure, UnknownTargetError


ROOT = Path(__file__).resolve().parent.parent


def _write(tmp_path: Path, text: str, name: str = "build.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_embedded_default_builds_every_shipped_target_with_float_and_int8():
    from targets import get_target
    from core.errors import TargetNotAvailableError

    shipped = set()
    for name in ("executorch", "ort", "coreml"):
        try:
            get_target(name)
            shipped.add(name)
        except TargetNotAvailableError:
            pass
    cfg = builder.load_config(None)
    pairs = {(a["target"], a["recipe"]) for a in cfg["artifacts"]}
    float_recipe = {"executorch": "fp32", "ort": "fp32", "coreml": "fp16"}
    assert pairs == {(t, r) for t in shipped for r in (float_recipe[t], "int8-static")}
    assert cfg["model"]["preset"] == "tiny"


def test_example_configs_parse():
    for name in ("build.toml", "build-9b.toml"):
        cfg = builder.load_config(ROOT / "examples" / name)
        assert cfg["artifacts"]


@pytest.mark.parametrize(
    "text, match",
    [
        ("[model]\npreset='tiny'\nbogus=1\n[[artifact]]\ntarget='ort'\nrecipe='fp32'\n", "unknown key"),
        ("[model]\npreset='tiny'\n", "no \\[\\[artifact\\]\\]"),
        ("[[artifact]]\ntarget='ort'\n", "needs both target and recipe"),
        ("[[artifact]]\ntarget='ort'\nrecipe='fp32'\n[[artifact]]\ntarget='ort'\nrecipe='fp32'\n", "duplicate"),
        ("[parity]\nthresholds={'text_decoder.cosin'=0.9}\n[[artifact]]\ntarget='ort'\nrecipe='fp32'\n", "cosin"),
        ("[model]\npreset='tiny'\ncheckpoint='x'\n[[artifact]]\ntarget='ort'\nrecipe='fp32'\n", "either preset or checkpoint"),
        ("not toml [", "not valid TOML"),
        ("[[artifact]]\ntarget='ort'\nrecipe='int8-weight'\nsmooth='high'\n", "smooth must be a number"),
        ("[[artifact]]\ntarget='ort'\nrecipe='int8-weight'\ngptq=1\n", "gptq must be true or false"),
        ("[[artifact]]\ntarget='ort'\nrecipe='int8-static'\nactivation_range=1\n", "activation_range must be a string"),
    ],
)
def test_bad_configs_are_rejected_with_the_key(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        builder.load_config(_write(tmp_path, text))


def test_thresholds_merge_global_recipe_and_artifact(tmp_path):
    cfg = builder.load_config(
        _write(
            tmp_path,
            "[parity.thresholds]\n'*.cosine'=0.5\n'text_decoder.cosine'=0.6\n"
            "[parity.recipe.fp32]\n'text_decoder.cosine'=0.7\n"
            "[[artifact]]\ntarget='ort'\nrecipe='fp32'\nthresholds={'audio_encoder.cosine'=0.8}\n",
        )
    )
    t = cfg["artifacts"][0]["thresholds"]
    assert t == {"*.cosine": 0.5, "text_decoder.cosine": 0.7, "audio_encoder.cosine": 0.8}


@pytest.mark.parametrize("entry, match", [
    ("target='executorch'\nrecipe='8da4w'\ngptq=true", "--gptq does not apply"),  # torchao's own grid
    ("target='ort'\nrecipe='fp32'\nsmooth=0.5", "--smooth applies to quantized recipes"),
    ("target='ort'\nrecipe='int8-static'\nsmooth=1.5", "smooth"),
    ("target='executorch'\nrecipe='int8-static'\nactivation_range='entropy'", "executorch offers mse, minmax"),
    ("target='coreml'\nrecipe='int8-weight'\nactivation_range='minmax'", "applies to static recipes"),
])
def test_calibration_algorithms_are_checked_like_the_export_options(tmp_path, entry, match):
    """smooth / gptq go through the export command's own checks, before --out exists."""
    from core.errors import BadInputError

    with pytest.raises(BadInputError, match=match):
        builder.build(_write(tmp_path, f"[[artifact]]\n{entry}\n"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_gptq_and_smooth_entries_build_and_are_recorded(tmp_path):
    """A build entry with gptq / smooth exports through export_model with them: the artifact's own record says so
    and the manifest keeps the settings."""
    from heldout import calibration_subset

    inputs = heldout_subset(tmp_path / "heldout.jsonl", kinds=("text",))
    calib = calibration_subset(tmp_path / "calib.jsonl", {"text": 8})  # smooth and GPTQ read the decoder's inputs
    cfg = _write(tmp_path, f"[model]\npreset='tiny'\n[calibration]\nmanifest='{calib}'\n"
                 f"[parity]\nsteps=2\ninputs='{inputs}'\n"
                 "[parity.thresholds]\n'*.cosine'=0.9\n"
                 "[[artifact]]\nname='g'\ntarget='ort'\nrecipe='int8-weight'\ngptq=true\nsmooth=0.5\n")
    builder.build(cfg, tmp_path / "out")
    (entry,) = json.loads((tmp_path / "out" / "manifest.json").read_text())["artifacts"]
    assert (entry["gptq"], entry["smooth"]) == (True, 0.5)
    comp = json.loads((tmp_path / "out" / "g" / "artifact.json").read_text())["metadata"]["compression"]
    assert comp["smooth"]["alpha"] == 0.5 and comp["gptq"]


def test_unknown_target_fails_before_any_model_work(tmp_path):
    cfg = _write(tmp_path, "[[artifact]]\ntarget='tflite'\nrecipe='fp32'\n")
    with pytest.raises(UnknownTargetError, match="tflite"):
        builder.build(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # --out is not even created


# --- real builds (the fastest available target, fp32) ------------------------------------------------


def _fast_target() -> str:
    from core.errors import TargetNotAvailableError
    from targets import get_target

    for name in ("ort", "executorch"):
        try:
            get_target(name)
            return name
        except TargetNotAvailableError:
            continue
    pytest.skip("neither the ort nor the executorch target is in this build yet")


def _config(tmp_path: Path, target: str, names=("a",), extra: str = "") -> Path:
    arts = "".join(f"[[artifact]]\nname='{n}'\ntarget='{target}'\nrecipe='fp32'\n" for n in names)
    inputs = heldout_subset(tmp_path / "heldout.jsonl", kinds=("text", "image+audio"))
    return _write(
        tmp_path,
        f"[model]\npreset='tiny'\n[parity]\nsteps=4\ninputs='{inputs}'\n{extra}\n{arts}",
        f"build-{len(names)}.toml",
    )


def _artifact_hashes(manifest_path: Path, key: str = "sha256") -> dict[str, str]:
    data = json.loads(manifest_path.read_text())
    return {a["name"]: a[key] for a in data["artifacts"]}


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory):
    target = _fast_target()
    tmp = tmp_path_factory.mktemp("builds")
    cfg = _config(tmp, target)
    first = builder.build(cfg, tmp / "one")
    second = builder.build(cfg, tmp / "two")
    return cfg, first, second


@pytest.mark.slow
def test_two_clean_builds_are_byte_identical(two_builds):
    _, first, second = two_builds
    a, b = json.loads(first.read_text()), json.loads(second.read_text())
    assert _artifact_hashes(first, "sha256_reproducible") == _artifact_hashes(second, "sha256_reproducible")
    for x, y in zip(a["artifacts"], b["artifacts"]):
        assert set(x["files"]) == set(y["files"])
        differ = sorted(n for n in x["files"] if x["files"][n] != y["files"][n])
        # every file that differs is one the manifest documents as not reproducible (with the reason)
        assert set(differ) <= set(x["not_reproducible"]), differ
        assert all(x["not_reproducible"].values())
        # and the model files themselves (.onnx / .pte) are byte-identical
        assert all(x["files"][n] == y["files"][n] for n in x["files"] if n.endswith((".onnx", ".pte")))
    assert a["config_sha256"] == b["config_sha256"]


@pytest.mark.slow
def test_manifest_records_what_the_issue_asks(two_builds):
    _, first, _ = two_builds
    data = json.loads(first.read_text())
    assert data["schema"] == builder.MANIFEST_SCHEMA and data["schema_version"] == 1 and data["complete"]
    e = data["artifacts"][0]
    for key in ("path", "sha256", "size_bytes", "target", "recipe", "runner_interface", "programs", "runtime_versions", "package_version"):
        assert e[key], key
    assert e["export"]["wall_s"] > 0 and e["export"]["peak_rss_mb"] > 0
    assert e["parity"]["passed"] and e["parity"]["provenance"]
    assert (first.parent / e["path"] / "parity" / "report.html").is_file()


@pytest.mark.slow
def test_rerun_skips_up_to_date_and_honours_config_thresholds(two_builds, tmp_path):
    cfg, first, _ = two_builds
    before = (first.parent / "a" / "artifact.json").stat().st_mtime_ns
    builder.build(cfg, first.parent)
    entry = json.loads(first.read_text())["artifacts"][0]
    assert entry["reused"] is True
    assert (first.parent / "a" / "artifact.json").stat().st_mtime_ns == before
    # only a threshold changed: parity again (no re-export), and the impossible threshold fails naming the method
    strict = _config(tmp_path, entry["target"], extra="thresholds={'text_decoder.max_abs'=-1.0}")
    with pytest.raises(ParityFailure, match="text_decoder.max_abs") as e:
        builder.build(strict, first.parent)
    assert "a:text_decoder.max_abs" in e.value.failures
    assert (first.parent / "a" / "artifact.json").stat().st_mtime_ns == before
    entry = json.loads(first.read_text())["artifacts"][0]
    assert entry["parity"]["passed"] is False and entry["parity"]["thresholds"]["text_decoder.max_abs"] == -1.0


@pytest.mark.slow
def test_killed_build_leaves_no_partial_artifact_and_next_build_completes(tmp_path):
    target = _fast_target()
    cfg = _config(tmp_path, target, names=("first", "second"))
    out = tmp_path / "out"
    code = f"from pathlib import Path; from exporter.build import build; build(Path({str(cfg)!r}), Path({str(out)!r}))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log = tmp_path / "build.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=f, stderr=subprocess.STDOUT)
    started = time.time()
    deadline = started + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if (out / "first").is_dir() and any(p.name.startswith(".staging-second") for p in out.iterdir()):
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"build ended before it could be killed: {log.read_text()[-500:]}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    print(f"killed after {time.time() - started:.1f}s")
    visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert "second" not in visible  # the artifact being written when killed is not there, not even in part
    data = json.loads((out / "manifest.json").read_text())
    assert [a["name"] for a in data["artifacts"]] == ["first"] and data["complete"] is False
    assert (out / "first" / "artifact.json").is_file() and (out / "first" / "parity" / "report.json").is_file()
    first_hash = _artifact_hashes(out / "manifest.json")["first"]
    # the next build removes the staging leftovers, keeps "first" and completes "second"
    t0 = time.time()
    builder.build(cfg, out)
    print(f"rerun {time.time() - t0:.1f}s")
    data = json.loads((out / "manifest.json").read_text())
    assert data["complete"] and [a["name"] for a in data["artifacts"]] == ["first", "second"]
    assert data["artifacts"][0]["reused"] is True and data["artifacts"][0]["sha256"] == first_hash
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
