"""Parity: metrics, thresholds, reports, and a corrupted artifact failing with exit 1."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch

from exporter import parity
from exporter.parity.inputs import refuse_calibration_set
from heldout import heldout_subset
from core.errors import ConfigError, ParityFailure


def test_compare_metrics_on_known_values():
    ref = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    m = parity.compare(ref, ref)
    assert m["max_abs"] == 0 and m["cosine"] == pytest.approx(1.0) and m["sqnr_db"] is None
    noisy = ref + np.array([0.1, -0.1, 0.1, -0.1], np.float32)
    m = parity.compare(ref, noisy)
    assert m["max_abs"] == pytest.approx(0.1, rel=1e-5)
    assert m["mean_abs"] == pytest.approx(0.1, rel=1e-5)
    assert m["sqnr_db"] == pytest.approx(10 * math.log10(30 / 0.04), rel=1e-4)
    assert parity.compare(ref, -ref)["cosine"] == pytest.approx(-1.0)
    assert parity.compare(ref, np.array([np.nan, 0, 0, 0]))["finite"] is False


def test_threshold_overrides_and_bad_keys():
    t = parity.thresholds_for("int8-static", {"text_decoder.cosine": 0.5, "decoder.top1_agreement": 0.25})
    assert t["*.cosine"] == 0.97 and t["text_decoder.cosine"] == 0.5 and t["decoder.top1_agreement"] == 0.25
    assert parity.thresholds_for("fp32")["decoder.greedy_match"] == 1.0
    with pytest.raises(ConfigError, match="text_decoder.cosin"):
        parity.thresholds_for("fp32", {"text_decoder.cosin": 0.9})


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    path = heldout_subset(tmp_path_factory.mktemp("heldout") / "heldout.jsonl")
    return path, parity.read_inputs(path)


@pytest.fixture(scope="module")
def perturbed_session():
    """The reference with one decoder weight scaled: a real PyTorch session that must fail fp32 parity."""
    from core.components import build_components
    from exporter.model import build, get_preset
    from core.runner import EagerSession

    model = build(get_preset("tiny"))
    with torch.no_grad():
        w = dict(model.text.layers[0].named_parameters())
        name = next(n for n in w if n.endswith("weight") and w[n].ndim == 2)
        w[name].mul_(1.5)
    return EagerSession(build_components(model))


@pytest.fixture(scope="module")
def reports(tiny_components, tiny_tokenizer, perturbed_session, heldout):
    from core.runner import EagerSession

    path, items = heldout
    ref = EagerSession(tiny_components)
    info = {"dir": "eager", "target": "eager", "recipe": "fp32", "model": "tiny", "files": {}, "source": {"preset": "tiny"}}
    cfg = tiny_components.config
    limits = parity.thresholds_for("fp32")
    same = parity.make_report(info, ref, EagerSession(tiny_components), cfg, tiny_tokenizer, items, path, limits, steps=6)
    bad = parity.make_report(info, ref, perturbed_session, cfg, tiny_tokenizer, items, path, limits, steps=6)
    return same, bad


def test_reference_against_itself_passes(reports):
    same, _ = reports
    assert same["passed"], same["failures"]
    assert same["decoder"]["greedy_match"] == 1.0 and same["decoder"]["top1_agreement"] == 1.0
    assert set(same["methods"]) >= {"token_embedding", "text_decoder"}
    parity.check(same)


def test_perturbed_weights_fail_naming_the_method(reports):
    _, bad = reports
    assert not bad["passed"]
    with pytest.raises(ParityFailure, match="text_decoder") as e:
        parity.check(bad)
    assert "text_decoder.cosine" in e.value.failures
    assert not any(f.startswith(("vision_encoder", "audio_encoder")) for f in e.value.failures)


def test_thresholds_are_honoured(reports):
    _, bad = reports
    results = {"methods": bad["methods"], "decoder": bad["decoder"]}
    cos = bad["methods"]["text_decoder"]["cosine"]
    loose = parity.evaluate(results, {"*.cosine": cos - 1e-6})
    assert all(c["passed"] for c in loose)
    tight = parity.evaluate(results, {"text_decoder.cosine": cos + 1e-6})
    assert [c["passed"] for c in tight] == [False]
    with pytest.raises(ConfigError, match="no method"):
        parity.evaluate(results, {"nope.cosine": 0.5})


def test_calibration_items_are_refused(tmp_path):
    from core.dataset import calibration_manifest

    from core.errors import BadInputError

    calib = calibration_manifest()
    first = json.loads(calib.read_text().splitlines()[0])
    for k in ("image", "audio"):
        if first.get(k):
            first[k] = str(calib.parent / first[k])
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps(first) + "\n")
    with pytest.raises(BadInputError, match="calibration set"):
        refuse_calibration_set(parity.read_inputs(mixed), mixed)
    with pytest.raises(BadInputError, match="calibration manifest"):
        refuse_calibration_set(parity.read_inputs(calib), calib)


def test_reports_written_junit_parses_and_html_is_self_contained(reports, tmp_path):
    _, bad = reports
    parity.write_reports(bad, tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["schema"] == parity.REPORT_SCHEMA and data["schema_version"] == parity.REPORT_SCHEMA_VERSION
    assert data["provenance"]["artifact"] and data["provenance"]["artifact_numbers"] == "real runtime"
    root = ET.parse(tmp_path / "junit.xml").getroot()
    suite = root.find("testsuite")
    cases = suite.findall("testcase")
    failed = [c.get("name") for c in cases if c.find("failure") is not None]
    assert "text_decoder.cosine" in failed and int(suite.get("failures")) == len(failed)
    page = (tmp_path / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "text_decoder" in page
    # self-contained: no scripts, no external references of any kind
    assert not re.search(r"(?i)<script|<link|<img|<iframe|@import|url\(|src=|href=", page)
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page


# --- a real artifact ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp32_artifact(exported):
    return exported("ort", "fp32")


@pytest.fixture(scope="module")
def corrupted_artifact(tmp_path_factory, fp32_artifact):
    """The same target and recipe exported from the tiny weights with one decoder matrix scaled by 1.5.

    Its artifact.json says the weights are the tiny preset's, as a silently corrupted file would.
    """
    from core.components import build_components
    from exporter.model import build, get_preset
    from core.recipes import Recipe
    from targets import get_target
    from targets.lifecycle import export

    model = build(get_preset("tiny"))
    with torch.no_grad():
        w = dict(model.text.layers[0].named_parameters())
        w[next(n for n in w if n.endswith("weight") and w[n].ndim == 2)].mul_(1.5)
    out = tmp_path_factory.mktemp("parity") / f"{fp32_artifact.target}-fp32-corrupted"
    return export(get_target(fp32_artifact.target), build_components(model), Recipe("fp32"), out,
                  source={"preset": "tiny", "layers": None})


@pytest.mark.slow
def test_artifact_passes_parity(fp32_artifact, heldout, tmp_path):
    import shutil

    art = shutil.copytree(fp32_artifact.dir, tmp_path / "artifact")  # the shared export stays as it was
    report = parity.run_parity(art, inputs=heldout[0], steps=8)
    assert report["passed"], report["failures"]
    assert report["provenance"]["artifact"] and report["decoder"]["greedy_match"] == 1.0
    for name in ("report.json", "report.html", "junit.xml"):
        assert (art / "parity" / name).is_file()  # reports go inside the artifact by default


@pytest.mark.slow
def test_corrupted_artifact_fails_with_exit_1_naming_the_method(corrupted_artifact, heldout, tmp_path):
    from typer.testing import CliRunner

    from cli import app

    result = CliRunner().invoke(app, ["parity", str(corrupted_artifact.dir), "--steps", "4", "--out", str(tmp_path), "--inputs", str(heldout[0])])
    assert result.exit_code == 1, result.output
    assert "text_decoder" in result.output
    junit = ET.parse(tmp_path / "junit.xml").getroot()
    failed = [c.get("name") for c in junit.iter("testcase") if c.find("failure") is not None]
    assert failed and all(f.startswith(("text_decoder", "decoder.")) for f in failed)


@pytest.mark.slow
def test_threshold_option_is_honoured(corrupted_artifact, heldout, tmp_path):
    """Loosened thresholds let the corrupted artifact pass; the same number fails a tight one."""
    loose = {"*.cosine": -1.0, "*.max_abs": 1e9, "decoder.greedy_match": 0.0}
    report = parity.run_parity(
        corrupted_artifact.dir, inputs=heldout[0], out_dir=tmp_path / "loose", thresholds=loose, steps=4
    )
    assert report["passed"], report["failures"]
    assert report["thresholds"]["*.cosine"] == -1.0
    cos = report["methods"]["text_decoder"]["cosine"]
    tight = parity.run_parity(
        corrupted_artifact.dir,
        inputs=heldout[0],
        out_dir=tmp_path / "tight",
        thresholds={**loose, "text_decoder.cosine": cos + 1e-9},
        steps=4,
    )
    assert [c["name"] for c in tight["checks"] if not c["passed"]] == ["text_decoder.cosine"]


def test_a_relative_inputs_path_resolves_media_once(tmp_path, monkeypatch):
    # parity --inputs examples/heldout-9b.jsonl from the repo root looked for examples/examples/inputs/...
    import shutil

    from core.dataset import heldout_manifest

    src = next(p for p in parity.read_inputs(heldout_manifest()) if p.image is not None)
    (tmp_path / "sub").mkdir()
    shutil.copy(src.image, tmp_path / "sub" / "img.png")
    (tmp_path / "sub" / "m.jsonl").write_text(json.dumps({"text": "what is this?", "image": "img.png"}) + "\n")
    monkeypatch.chdir(tmp_path)
    (item,) = parity.read_inputs("sub/m.jsonl")
    assert item.image == Path("sub/img.png") and item.image.is_file()
