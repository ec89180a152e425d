"""--out never costs the user data: only an empty dir or a previous artifact of ours is replaced.

Refusals come before any model work; the artifact directory honours the umask; staging dirs a killed run
left beside --out are removed by the next run on the same --out; every artifact folder carries
tokenizer_config.json with the model's chat template (what the runtimes' own tokenizers read).
"""

from __future__ import annotations

import json
import os
import stat
import time

import pytest
from typer.testing import CliRunner

from cli import app

EXPORT = ["export", "--target", "ort", "--recipe", "fp32"]


def _run(args, cwd):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(app, args)
    finally:
        os.chdir(old)


def _tree(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1) for p in root.rglob("*"))


@pytest.mark.parametrize(
    "layout, message",
    [
        ({"mydata/thesis.txt": "x"}, "is not an autoglm-export artifact"),
        ({"mydata/sub/notes.md": "y"}, "is not an autoglm-export artifact"),
        ({"mydata": "a file, not a dir"}, "is not a directory"),
    ],
)
def test_out_that_is_not_ours_is_refused_before_work(tmp_path, layout, message):
    for name, text in layout.items():
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    before = _tree(tmp_path)
    t0 = time.perf_counter()
    r = _run([*EXPORT, "--out", "mydata"], tmp_path)
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert _tree(tmp_path) == before  # nothing written, nothing deleted
    assert time.perf_counter() - t0 < 30  # refused up front, not after an export


def test_out_dot_is_refused(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    before = _tree(tmp_path)
    r = _run([*EXPORT, "--out", "."], tmp_path)
    assert r.exit_code == 2 and "current directory" in r.output
    assert _tree(tmp_path) == before


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One real export, under umask 027, with a killed run's leftovers beside --out."""
    root = tmp_path_factory.mktemp("outdir")
    for left in (".art.partial-abc123", ".art.work-def456", ".art.old-0a1b2c"):
        (root / left).mkdir()
        (root / left / "model.onnx").write_text("half-written")
    (root / ".other.partial-zzz").mkdir()  # another output's staging dir is not ours to remove
    old = os.umask(0o027)
    try:
        r = _run([*EXPORT, "--out", "art"], root)
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    return root


@pytest.mark.slow
def test_killed_runs_leftovers_are_removed(exported):
    names = sorted(p.name for p in exported.iterdir())
    assert names == [".other.partial-zzz", "art"]


@pytest.mark.slow
def test_artifact_dir_honours_umask(exported):
    mode = stat.S_IMODE((exported / "art").stat().st_mode)
    assert mode == 0o750  # mkdtemp would give 0700
    for f in (exported / "art").iterdir():
        if f.is_file():
            assert stat.S_IMODE(f.stat().st_mode) & 0o040  # group-readable under umask 027
            assert not stat.S_IMODE(f.stat().st_mode) & 0o007  # and not other-readable


@pytest.mark.slow
def test_artifact_carries_tokenizer_config_with_chat_template(exported):
    from exporter.model.config import get_preset

    cfg = json.loads((exported / "art" / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == get_preset("tiny").chat_template
    assert cfg["eos_token"] == "<|endoftext|>"
    info = json.loads((exported / "art" / "artifact.json").read_text())
    assert "tokenizer_config.json" in info["files"]


@pytest.mark.slow
def test_previous_artifact_is_replaced(exported):
    marker = exported / "art" / "artifact.json"
    before = marker.stat().st_mtime_ns
    r = _run([*EXPORT, "--out", "art"], exported)
    assert r.exit_code == 0, r.output
    assert marker.stat().st_mtime_ns != before
    assert sorted(p.name for p in exported.iterdir()) == [".other.partial-zzz", "art"]  # no .old left
