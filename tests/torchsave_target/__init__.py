"""A minimal extra target, registered by tests/test_targets.py with one line (targets.TARGETS["torchsave"]).

It saves the four methods with torch.save and runs them back with the eager modules: no runtime of its own,
so the suite can show that a target is only its spec plus the two hooks (build, open); export, parity,
build and bench take it through with no edit anywhere else.
"""

from __future__ import annotations

from core.recipes import FLOAT32, RecipeName
from targets.spec import Gate, RecipeSpec, TargetSpec

SPEC = TargetSpec(
    name="torchsave",
    description="torch.save'd PyTorch modules, run eagerly (a test target)",
    recipes=(RecipeSpec(RecipeName.FP32, FLOAT32, Gate(0.99999, 1e-5)),),
    runtime_packages=(),
)


def load_target():
    from torchsave_target.target import TorchSaveTarget

    return TorchSaveTarget()
