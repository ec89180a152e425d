"""The export check every target runs before it writes anything (targets.base.export_gate).

Each target exports the tiny preset cut to 1 decoder layer and 1 vision block (the same paths, a
quicker export) and its real runtime runs the program it just wrote; a program outside its recipe's
floor fails with one line naming the method and its numbers, and the output directory never appears.
"""

from __future__ import annotations

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

    import targets.executorch as et

    monkeypatch.setattr(et, "_torchao_config", lambda recipe: IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)))
    # the wrong numbers show first in the program's own token_embedding row for <|begin_of_image|> (the text_decoder's
    # image marker check), else in the export check proper: either way the program is refused and nothing is written
    with pytest.raises(ExportError, match="int8-weight program rejected by the export check|would not recognise an image prefill"):
        et.ExecuTorchTarget().export(small, Recipe("int8-weight"), tmp_path / "bad")
    assert list(tmp_path.iterdir()) == []


def test_coreml_rejects_a_program_below_its_floor(small, tmp_path, monkeypatch):
    import targets.coreml as cm

    # a floor no int8 program can meet
    monkeypatch.setitem(cm.GATE, "int8-weight", (0.999999999, None))
    with pytest.raises(ExportError, match="coreml int8-weight program rejected by the export check: .* cosine"):
        cm.CoreMLTarget().export(small, Recipe("int8-weight"), tmp_path / "bad")
    assert list(tmp_path.iterdir()) == []


def test_ort_rejects_a_program_above_its_relative_l2_ceiling(small, tmp_path, monkeypatch):
    import targets.ort as ort_target

    # an fp32 program is within float rounding of eager; a relative-L2 ceiling of 0 no real runtime meets
    monkeypatch.setitem(ort_target.GATE, "fp32", (0.99999, 0.0))
    with pytest.raises(ExportError, match=r"ort fp32 program rejected by the export check: \w+ cosine 1\.0000\d, relative L2"):
        ort_target.OrtTarget().export(small, Recipe("fp32"), tmp_path / "bad")
    assert list(tmp_path.iterdir()) == []

