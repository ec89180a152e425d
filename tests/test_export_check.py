"""The export check (targets.base.export_gate, run by targets/lifecycle.py for every target) catches a real
wrong-numbers lowering: ExecuTorch's XNNPACK weight-only int8 path. The generic refusal (a program outside its
gate, nothing written) is in the conformance suite, tests/test_targets.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from core.errors import ExportError
from core.recipes import Recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small():
    from core.components import build_components
    from exporter.model import build, get_preset

    return build_components(build(get_preset("tiny").with_layers(1, vision_layers=1)))


def test_executorch_rejects_the_lowering_path_that_returns_wrong_numbers(small, tmp_path, monkeypatch):
    # STACK.md: torchao int8 weight-only lowered to XNNPACK runs but returns wrong numbers in executorch 1.5.1
    from torchao.quantization.granularity import PerAxis
    from torchao.quantization.quant_api import IntxWeightOnlyConfig

    from core.components import build_components
    from exporter.model import build, get_preset
    from targets import get_target
    from targets.executorch import quantize
    from targets.lifecycle import export

    monkeypatch.setattr(quantize, "torchao_config",
                        lambda scheme, group_size: IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)))
    # the wrong numbers show first in the program's own token_embedding row for <|begin_of_image|> (the text_decoder's
    # image marker check), else in the export check proper: either way the program is refused and nothing is written.
    # The audio encoder lowers to XNNPACK whole (targets/executorch/encoders.py), and with this config inside it
    # XNNPACK's ConvertToLinearPass raises during lowering: the model without audio reaches the numbers check
    no_audio = build_components(build(dataclasses.replace(get_preset("tiny").with_layers(1, vision_layers=1), audio=None, fusion=False)))
    with pytest.raises(ExportError, match="int8-weight program rejected by the export check|would not recognise an image prefill"):
        export(get_target("executorch"), no_audio, Recipe("int8-weight"), tmp_path / "bad")
    # with the audio tower the same config is refused at lowering, by a line that names the step
    with pytest.raises(ExportError, match=r"int8-weight program rejected by the export check|would not recognise an image prefill|XNNPACK lowering \(int8-weight\) failed"):
        export(get_target("executorch"), small, Recipe("int8-weight"), tmp_path / "bad")
    assert list(tmp_path.iterdir()) == []


def test_check_floor_replaces_the_recipes_gate(small, tmp_path):
    # a floor above what int8 rounding can reach refuses the program (nothing written); a lowered floor accepts
    # it, drops the relative-L2 ceiling and says in artifact.json that the user set it
    from core.artifact import read_artifact
    from targets import get_target
    from targets.lifecycle import export

    ort = get_target("ort")
    with pytest.raises(ExportError, match=r"int8-weight program rejected by the export check: \w+ cosine .*needs cosine >= 0.9999999\)"):
        export(ort, small, Recipe("int8-weight"), tmp_path / "strict", check_floor=0.9999999)
    assert list(tmp_path.iterdir()) == []
    art = export(ort, small, Recipe("int8-weight"), tmp_path / "lenient", check_floor=0.5)
    check = read_artifact(art.dir).info["report"]["export_check"]
    assert check["floor_cosine"] == 0.5 and check["max_relative_l2"] is None
    assert check["floor_set_by_user"]["recipe_default"] == {"floor_cosine": 0.99, "max_relative_l2": 0.15}
    assert all(0.5 <= m["cosine"] < 0.9999999 for m in check["methods"].values())


def test_check_floor_out_of_range_is_refused_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from cli import app

    r = CliRunner().invoke(app, ["export", "--target", "ort", "--recipe", "int4-weight", "--out", str(tmp_path / "a"),
                                 "--check-floor", "1.5"])
    assert r.exit_code == 2 and "--check-floor 1.5" in r.output
    assert not (tmp_path / "a").exists()
