"""bench: per-runtime timings in their own processes, the bandwidth bound, JSON and the table."""

from __future__ import annotations

import json

import pytest

from exporter import bench


def test_bandwidth_is_measured_and_plausible():
    bw = bench.measure_bandwidth(mib=32, repeats=2)
    assert 1e8 < bw < 1e13  # between 0.1 GB/s and 10 TB/s


def test_decoder_weight_elements_counts_layers_norm_and_head():
    from exporter.model import build, get_preset

    cfg = get_preset("tiny")
    t = build(cfg).text
    n = sum(p.numel() for p in t.layers.parameters()) + sum(p.numel() for p in t.norm.parameters())
    head = t.embed_tokens.weight if cfg.text.tie_embeddings else t.lm_head.weight
    assert bench.decoder_weight_elements(cfg) == n + head.numel()


@pytest.fixture(scope="module")
def artifact(exported):
    return exported("ort", "fp32")


@pytest.mark.slow
def test_bench_times_artifact_and_eager_baseline(artifact, tmp_path):
    out = tmp_path / "bench.json"
    result = bench.run_bench(artifact.dir, out, prompt_len=32, steps=4, repeats=1)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    labels = [r["label"] for r in result["runtimes"]]
    assert labels == [f"{artifact.target} fp32", "eager fp32"]
    for r in result["runtimes"]:
        assert r["first_load_s"] >= 0 and r["load_s"] >= 0 and r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["peak_rss_mb"] > 0
        assert r["decode_bound_tok_s"] == pytest.approx(
            result["host"]["copy_bandwidth_gb_s"] * 1e9 / r["weight_bytes_per_token"]
        )
        assert r["provenance"]
    assert result["runtimes"][0]["artifact_bytes"] == sum(f["bytes"] for f in artifact.info["files"].values())
    table = bench.format_table(result)
    assert "decode tok/s" in table and "eager fp32" in table and "GB/s" in table


def test_bench_cli_without_eager_times_only_the_artifact(artifact, tmp_path):
    """--no-eager (a 9B's eager reference would time the disk) leaves the eager row out; the options reach the run."""
    from typer.testing import CliRunner

    from cli import app

    out = tmp_path / "bench.json"
    res = CliRunner().invoke(app, ["bench", str(artifact.dir), "--no-eager", "--prompt-len", "8", "--steps", "2",
                                   "--repeats", "1", "--json", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert [r["label"] for r in result["runtimes"]] == [f"{artifact.target} fp32"]
    assert result["settings"] == {"prompt_len": 8, "decode_steps": 2, "repeats": 1, "statistic": "median"}
    assert "eager" not in res.output
    bad = CliRunner().invoke(app, ["bench", str(artifact.dir), "--steps", "0"])
    assert bad.exit_code != 0 and "--steps 0: must be at least 1" in bad.output
