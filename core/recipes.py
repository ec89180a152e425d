"""Recipes, defined once: their names, what each quantizes, and the defaults every layer reads.

A recipe is a precision plan (``fp32``, ``int8-static``, ...). :data:`RECIPES` holds one
:class:`RecipeDef` per :class:`RecipeName`: whether it takes ``--group-size`` and calibration data,
and its default parity thresholds. What a recipe quantizes on a given runtime is a
:class:`QuantScheme`, declared by each target's spec (``targets/<name>/spec.py``) and read both by the
target that implements it and by the sensitivity simulation (calibration/sensitivity.py), so the two
cannot drift apart. A user's choice is a :class:`Recipe`: the name plus ``keep_float`` and
``group_size``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

from core.errors import UnknownRecipeError


class RecipeName(enum.StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8_WEIGHT = "int8-weight"
    INT8_STATIC = "int8-static"
    W4_DA8 = "8da4w"
    INT4_WEIGHT = "int4-weight"


Activations = Literal["float", "static", "dynamic"]


@dataclass(frozen=True)
class QuantScheme:
    """What a recipe does to a model on one runtime.

    weight_bits: None (float weights), 8 or 4, symmetric; per output channel, or per group of
        ``Recipe.group_size`` inputs when ``groupwise``
    activations: a quantized linear's input: ``float``; ``static`` (int8 per tensor, range from the
        calibration set); ``dynamic`` (int8 per token, range measured at run time)
    embedding_bits: None or 8 (int8 embedding table, per row)
    float_dtype: the dtype of what stays float (``float16`` on Core ML)
    """

    weight_bits: int | None = None
    groupwise: bool = False
    activations: Activations = "float"
    embedding_bits: int | None = None
    float_dtype: str = "float32"

    @property
    def quantized(self) -> bool:
        return self.weight_bits is not None

    @property
    def simulation(self) -> str:
        """The sensitivity simulation's name for it: ``w8a8``, ``w8``, ``w8da8`` (``w4...`` for 4 bits)."""
        if self.weight_bits is None:
            return "float"
        act = {"float": "", "static": "a8", "dynamic": "da8"}[self.activations]
        return f"w{self.weight_bits}{act}"

    def describe(self) -> str:
        if self.weight_bits is None:
            return f"{self.float_dtype} weights and activations"
        grain = "per group" if self.groupwise else "per output channel"
        act = {"float": "float inputs", "static": "static int8 inputs (per tensor, calibrated)",
               "dynamic": "dynamic int8 inputs (per token)"}[self.activations]
        emb = ", int8 embeddings" if self.embedding_bits == 8 else ""
        return f"int{self.weight_bits} weights {grain}, {act}{emb}"


FLOAT32 = QuantScheme()
FLOAT16 = QuantScheme(float_dtype="float16")


@dataclass(frozen=True)
class WeightGrid:
    """The symmetric integer grid a target's quantizer puts a linear's weight [out, in] on, stated exactly, so
    that weights rounded onto it beforehand (``--gptq``) come out of that quantizer integer for integer.

    One scale per row and group of ``group`` input columns (0: the whole row). ``full_range`` (onnxruntime's
    MatMulNBits): scale = the group's signed extreme / -2^(bits-1), integers in [-2^(bits-1), 2^(bits-1) - 1].
    Otherwise (restricted: ORT's and XNNPACK's per-channel int8, coremltools' linear_symmetric):
    scale = max|w| / (2^(bits-1) - 1), integers in +-(2^(bits-1) - 1). ``tiles_only``: a weight whose input
    width the group does not tile is quantized int8 per channel instead (coremltools' per-block).
    """

    bits: int = 8
    group: int = 0
    full_range: bool = False
    tiles_only: bool = False

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.full_range else -self.qmax

    def for_width(self, cols: int) -> "WeightGrid":
        """The grid a weight of ``cols`` input columns gets."""
        if self.group and self.tiles_only and cols % self.group:
            return WeightGrid()
        return self

    def describe(self) -> str:
        grain = f"blocks of {self.group}" if self.group else "per row"
        scale = f"signed extreme / {self.qmin}" if self.full_range else f"max|w| / {self.qmax}"
        return f"int{self.bits} {grain}, scale {scale}, integers {self.qmin}..{self.qmax}"


@dataclass(frozen=True)
class RecipeDef:
    name: RecipeName
    doc: str
    grouped: bool = False  # takes --group-size (weights quantized in groups along the input)
    needs_calibration: bool = False  # reads activation ranges from a calibration set
    parity_thresholds: tuple[tuple[str, float], ...] = ()  # parity's defaults for this recipe

    @property
    def quantized(self) -> bool:
        return self.name not in (RecipeName.FP32, RecipeName.FP16)


RECIPES: dict[RecipeName, RecipeDef] = {
    d.name: d
    for d in (
        RecipeDef(RecipeName.FP32, "float32", parity_thresholds=(("*.cosine", 0.9999), ("*.max_abs", 1e-3),
                                                                 ("decoder.greedy_match", 1.0))),
        RecipeDef(RecipeName.FP16, "float16 compute (Core ML)", parity_thresholds=(("*.cosine", 0.999),)),
        RecipeDef(RecipeName.INT8_WEIGHT, "int8 weights per channel", parity_thresholds=(("*.cosine", 0.999),)),
        RecipeDef(RecipeName.INT8_STATIC, "int8 weights and calibrated int8 activations", needs_calibration=True,
                  parity_thresholds=(("*.cosine", 0.97),)),
        RecipeDef(RecipeName.W4_DA8, "int4 group-wise weights, dynamic int8 activations (XNNPACK)", grouped=True,
                  parity_thresholds=(("*.cosine", 0.97),)),
        # 4-bit weights on tiny's random weights: measured decoder cosine 0.962 (ORT) / 0.948 (Core ML
        # interpreter) on the held-out set, every other method >= 0.997; a broken program (nibbles swapped,
        # scales lost) is < 0.90
        RecipeDef(RecipeName.INT4_WEIGHT, "int4 block-wise weights, float activations", grouped=True,
                  parity_thresholds=(("*.cosine", 0.93),)),
    )
}

DEFAULT_GROUP_SIZE = 32  # the grouped recipes' weight group when --group-size is not given

ALL_RECIPES: tuple[str, ...] = tuple(r.value for r in RecipeName)
GROUPED_RECIPES: tuple[str, ...] = tuple(n.value for n, d in RECIPES.items() if d.grouped)


def recipe_name(name: str) -> RecipeName:
    """The :class:`RecipeName` called ``name``, or UnknownRecipeError naming the known ones."""
    try:
        return RecipeName(name)
    except ValueError:
        raise UnknownRecipeError(f"unknown recipe '{name}'; known recipes: {', '.join(ALL_RECIPES)}") from None


@dataclass(frozen=True)
class Recipe:
    """A user's choice: which recipe, which modules stay float, the weight group size.

    keep_float: module names (as in ``model.named_modules()``) left in float
    group_size: weight group size (0 = per channel); unset: 32 for the grouped recipes, 0 (per channel) for the
        others, which a target may also quantize in blocks (``RecipeSpec.blocks_on_request``)
    activation_range: how a static recipe sets its activation ranges from the calibration set, one of the target's
        ``RecipeSpec.activation_ranges``; unset: the target's default (the first of them)
    """

    name: RecipeName
    keep_float: tuple[str, ...] = ()
    group_size: int | None = None
    activation_range: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", recipe_name(str(self.name)))
        object.__setattr__(self, "keep_float", tuple(self.keep_float))
        if self.group_size is None:
            object.__setattr__(self, "group_size", DEFAULT_GROUP_SIZE if self.definition.grouped else 0)

    @property
    def definition(self) -> RecipeDef:
        return RECIPES[self.name]

    @property
    def is_quantized(self) -> bool:
        return self.definition.quantized

    @property
    def needs_calibration(self) -> bool:
        return self.definition.needs_calibration

    @property
    def grouped(self) -> bool:
        return self.definition.grouped
