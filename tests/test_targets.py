"""Conformance: every registered target, and a minimal extra one registered here with one line, goes
through the same lifecycle: export (through targets.lifecycle), the export check, a session, parity, bench
and build. Target-specific behaviour (lowering, genai, the MIL interpreter...) is in each target's own file.

Each target is tested with its float recipe (the spec's first); the tiny exports come from the session
fixture ``exported`` shared with the target files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.artifact import read_artifact, verify_artifact
from core.errors import ExportError
from core.recipes import Recipe
from targets import TARGETS, get_target, target_spec
from targets.spec import Gate

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
EXTRA = "torchsave"  # tests/torchsave_target: torch.save'd modules run eagerly
ALL = [*TARGETS, EXTRA]


@pytest.fixture(scope="module", autouse=True)
def extra_target():
    """The one registry line a new target needs: kept outside the package, it is an entry of
    $AUTOGLM_EXPORT_TARGETS (subprocesses such as bench's see it too)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AUTOGLM_EXPORT_TARGETS", f"{EXTRA}=torchsave_target")
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
        yield


def float_recipe(name: str) -> str:
    return target_spec(name).recipes[0].recipe.value


@pytest.fixture(scope="module", params=ALL)
def artifact(request, exported):
    return exported(request.param, float_recipe(request.param))


def test_spec_is_complete_and_loads_without_the_runtime():
    for name in ALL:
        spec = target_spec(name)
        assert spec.name == name and spec.recipes and spec.description
        for r in spec.recipes:
            assert r.gate.floor_cosine > 0.9 and r.scheme is not None
        assert len(set(spec.recipe_names)) == len(spec.recipe_names)
    # the specs (the CLI's --help and every pre-model check read them) import no runtime
    code = ("import sys, targets; [targets.target_spec(t) for t in targets.TARGETS]; "
            "heavy = [m for m in ('executorch', 'onnxruntime', 'coremltools', 'onnx') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=TESTS.parent)


def test_export_writes_a_complete_verified_artifact(artifact, tiny_components):
    spec = target_spec(artifact.target)
    info = artifact.info
    verify_artifact(artifact)  # every file's sha256 is the recorded one
    assert set(info["runner_interface"]) == set(tiny_components.methods())
    assert set(info["programs"]) == set(tiny_components.methods())
    assert info["metadata"]["source"] == {"preset": "tiny", "layers": None}
    assert info["metadata"]["model"]["name"] == "tiny"
    assert {"torch", *spec.runtime_packages} <= set(info["runtime_versions"])
    assert "tokenizer.json" in info["files"] and "tokenizer_config.json" in info["files"]
    check = info["report"]["export_check"]
    assert check["measured"] is True
    gate = spec.recipe(artifact.recipe).gate
    for m, r in check["methods"].items():
        assert r["cosine"] >= gate.floor_cosine, (artifact.target, m, r)
    assert info["export"]["wall_s"] > 0 and info["export"]["peak_rss_mb"] > 0
    memory = info["export"]["memory_mib"]  # phase by phase: resident at its end <= the peak so far
    assert {"built", "eager_reference", "program_opened", "checked"} == set(memory)
    assert all(0 < m["rss_mib"] <= m["peak_mib"] for m in memory.values())


def test_session_runs_every_method_with_the_interface_shapes(artifact, eager_run):
    """The session's outputs have the runner interface's shapes, and are the eager reference's numbers."""
    from targets.base import method_outputs

    session = get_target(artifact.target).open(read_artifact(artifact.dir))
    assert session.provenance
    runner, segments = eager_run["runner"], eager_run["segments"]
    tokens = eager_run["result"].tokens[:2]
    got = method_outputs(session, runner, segments, tokens)
    ref = method_outputs(runner.session, runner, segments, tokens)
    iface = artifact.info["runner_interface"]
    assert set(got) == set(iface)
    for m, out in got.items():
        width = list(iface[m]["outputs"].values())[0][1][-1]
        assert out.shape == ref[m].shape and out.shape[-1] == width, (m, out.shape)
        cos = float(np.dot(out.ravel(), ref[m].ravel()) / (np.linalg.norm(out) * np.linalg.norm(ref[m])))
        assert cos > 0.99, (m, cos)
    session.reset()


def test_parity_passes(artifact, tmp_path):
    from exporter.parity import run_parity
    from heldout import heldout_subset

    inputs = heldout_subset(tmp_path / "heldout.jsonl", kinds=("text", "image+audio"))
    report = run_parity(artifact.dir, inputs=inputs, out_dir=tmp_path / "parity", steps=6)
    assert report["passed"], report["failures"]
    assert report["provenance"]["artifact"] == get_target(artifact.target).open(artifact).provenance
    assert report["decoder"]["greedy_match"] == 1.0


def test_bench_measures_it_beside_eager(artifact, tmp_path):
    from exporter.bench import run_bench

    result = run_bench(artifact.dir, tmp_path / "bench.json", prompt_len=16, steps=4, repeats=1)
    labels = [r["label"] for r in result["runtimes"]]
    assert labels == [f"{artifact.target} {artifact.recipe}", "eager fp32"]
    assert all(r["decode_tok_s"] > 0 for r in result["runtimes"])
    assert result["runtimes"][0]["artifact_bytes"] == sum(f["bytes"] for f in artifact.info["files"].values())


@pytest.mark.parametrize("name", ALL)
def test_a_program_outside_its_gate_is_refused_and_nothing_is_written(name, tmp_path):
    """The lifecycle's export check applies each target's gate: a cosine floor above 1 no program meets."""
    from core.components import build_components
    from exporter.model import build, get_preset
    from targets.lifecycle import export

    small = build_components(build(get_preset("tiny").with_layers(1, vision_layers=1)))
    target = get_target(name)
    rspec = target.spec.recipes[0]
    strict = dataclasses.replace(rspec, gate=Gate(1.0 + 1e-6))
    target.spec = dataclasses.replace(target.spec, recipes=(strict, *target.spec.recipes[1:]))
    with pytest.raises(ExportError, match=rf"{name} {rspec.recipe} program rejected by the export check: \w+ cosine"):
        export(target, small, Recipe(rspec.recipe), tmp_path / "bad")
    assert list(tmp_path.iterdir()) == []


def test_the_extra_target_goes_through_export_parity_build_and_bench(tmp_path):
    """Registered with one line: the export command, parity, build and bench take it with no edit elsewhere."""
    from exporter import bench, pipeline
    from heldout import heldout_subset

    art = pipeline.export(EXTRA, "fp32", tmp_path / "a")
    assert art.target == EXTRA and (art.dir / "components.pt").is_file()
    inputs = heldout_subset(tmp_path / "heldout.jsonl", kinds=("text", "image+audio"))
    lines, report = pipeline.parity(art.dir, inputs=inputs, steps=4, out=tmp_path / "parity")
    assert report["passed"] and report["decoder"]["greedy_match"] == 1.0
    result = bench.run_bench(art.dir, prompt_len=16, steps=4, repeats=1)
    assert f"{EXTRA} fp32" in bench.format_table(result)
    config = tmp_path / "build.toml"
    config.write_text(f"[parity]\nsteps = 4\ninputs = '{inputs}'\n\n[[artifact]]\ntarget = '{EXTRA}'\nrecipe = 'fp32'\n")
    manifest = json.loads(pipeline.build(config, tmp_path / "build").read_text())
    (entry,) = manifest["artifacts"]
    assert entry["target"] == EXTRA and entry["parity"]["passed"] and manifest["complete"]


def test_the_cli_offers_a_registered_target(tmp_path):
    """The command line reads its --target choices from the registry: the extra target exports through
    `autoglm-export export`; without the registry entry the name is a usage error (exit 2)."""
    cmd = [sys.executable, "-c", "import sys, cli; sys.argv[0] = 'autoglm-export'; cli.app()", "export", "--target",
           EXTRA, "--recipe", "fp32", "--out"]
    ok = subprocess.run([*cmd, str(tmp_path / "a")], capture_output=True, text=True, cwd=TESTS.parent)
    assert ok.returncode == 0, ok.stderr
    assert read_artifact(tmp_path / "a").target == EXTRA
    env = {k: v for k, v in os.environ.items() if k != "AUTOGLM_EXPORT_TARGETS"}
    bad = subprocess.run([*cmd, str(tmp_path / "b")], capture_output=True, text=True, cwd=TESTS.parent, env=env)
    assert bad.returncode == 2 and EXTRA in bad.stderr and not (tmp_path / "b").exists()
