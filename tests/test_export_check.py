"""The export check (targets.base.export_gate, run by targets/lifecycle.py for every target) catches a real
wrong-numbers lowering: ExecuTorch's XNNPACK weight-only int8 path. The generic refusal (a program outside its
gate, nothing written) is in the conformance suite, tests/test_targets.py.
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

    from targets import get_target
    from targets.executorch import quantize
    from targets.lifecycle import export

    monkeypatch.setattr(quantize, "torchao_config",
                        lambda scheme, group_size: IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)))
    # the wrong numbers show first in the program's own token_embedding row for <|begin_of_image|> (the text_decoder's
    # image marker check), else in the export check proper: either way the program is refused and nothing is written
    with pytest.raises(ExportError, match="int8-weight program rejected by the export check|would not recognise an image prefill"):
        export(get_target("executorch"), small, Recipe("int8-weight"), tmp_path / "bad")
    assert list(tmp_path.iterdir()) == []
