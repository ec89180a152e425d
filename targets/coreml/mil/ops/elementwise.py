"""Elementwise ops: binary (with broadcasting), unary, activations, softmax."""

from __future__ import annotations

import math

import numpy as np

from targets.coreml.mil.ops.base import f32, float_of, int_of, register, torch_module, variant_error


# elementwise binary
_BINARY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "maximum": np.maximum, "minimum": np.minimum,
    "equal": np.equal, "not_equal": np.not_equal, "less": np.less, "less_equal": np.less_equal,
    "greater": np.greater, "greater_equal": np.greater_equal, "logical_and": np.logical_and,
    "logical_or": np.logical_or, "logical_xor": np.logical_xor,
}
for _name, _fn in _BINARY.items():
    register(_name)(lambda a, n, _fn=_fn: _fn(a["x"], a["y"]))


@register("real_div")
def _real_div(a, n):
    x, y = a["x"], a["y"]
    if np.issubdtype(np.asarray(x).dtype, np.integer) and np.issubdtype(np.asarray(y).dtype, np.integer):
        return np.trunc(np.true_divide(x, y))  # int32: true division, truncated by the int32 output
    return np.true_divide(f32(x), f32(y))


@register("floor_div")
def _floor_div(a, n):
    return np.floor_divide(a["x"], a["y"])


@register("mod")
def _mod(a, n):
    return np.mod(a["x"], a["y"])


@register("pow")
def _pow(a, n):
    x, y = a["x"], a["y"]
    if np.issubdtype(np.asarray(x).dtype, np.floating) or np.issubdtype(np.asarray(y).dtype, np.floating):
        return np.power(f32(x), f32(y))
    return np.power(x, y)


# elementwise unary
def erf(x: np.ndarray) -> np.ndarray:
    torch = torch_module()
    return torch.special.erf(torch.from_numpy(f32(x))).numpy()


_UNARY = {
    "abs": np.abs, "acos": np.arccos, "asin": np.arcsin, "atan": np.arctan, "atanh": np.arctanh,
    "ceil": np.ceil, "cos": np.cos, "cosh": np.cosh, "exp": np.exp, "exp2": np.exp2, "floor": np.floor,
    "logical_not": np.logical_not, "round": np.round, "sign": np.sign, "sin": np.sin, "sinh": np.sinh,
    "sqrt": np.sqrt, "square": np.square, "tan": np.tan, "tanh": np.tanh, "erf": erf,
    "relu": lambda x: np.maximum(x, 0).astype(np.asarray(x).dtype),
    "relu6": lambda x: np.clip(x, 0, 6),
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-f32(x))),
    "softsign": lambda x: x / (1.0 + np.abs(x)),
    "softplus": lambda x: np.logaddexp(np.float32(0), f32(x)),
    "silu": lambda x: f32(x) / (1.0 + np.exp(-f32(x))),
    "identity": lambda x: x,
}
for _name, _fn in _UNARY.items():
    register(_name)(lambda a, n, _fn=_fn: _fn(a["x"]))


@register("rsqrt")
def _rsqrt(a, n):
    return 1.0 / np.sqrt(f32(a["x"]) + np.float32(float_of(a.get("epsilon", 1e-12))))


@register("log")
def _log(a, n):
    return np.log(f32(a["x"]) + np.float32(float_of(a.get("epsilon", 1e-45))))


@register("inverse")
def _inverse(a, n):
    return 1.0 / (f32(a["x"]) + np.float32(float_of(a.get("epsilon", 1e-4))))


@register("clip")
def _clip(a, n):
    return np.clip(a["x"], float_of(a["alpha"]), float_of(a["beta"]))


@register("threshold")
def _threshold(a, n):
    return np.maximum(a["x"], np.float32(float_of(a["alpha"])))


@register("leaky_relu")
def _leaky_relu(a, n):
    x = f32(a["x"])
    return np.where(x >= 0, x, np.float32(float_of(a.get("alpha", 0.01))) * x)


@register("elu")
def _elu(a, n):
    x = f32(a["x"])
    return np.where(x > 0, x, np.float32(float_of(a.get("alpha", 1.0))) * (np.exp(x) - 1))


@register("clamped_relu")
def _clamped_relu(a, n):
    x = f32(a["x"])
    alpha, beta = np.float32(float_of(a["alpha"])), np.float32(float_of(a["beta"]))
    return np.minimum(np.where(x >= 0, x, alpha * x), beta)


@register("linear_activation")
def _linear_activation(a, n):
    return np.float32(float_of(a["alpha"])) * f32(a["x"]) + np.float32(float_of(a.get("beta", 0.0)))


@register("scaled_tanh")
def _scaled_tanh(a, n):
    return np.float32(float_of(a.get("alpha", 1.0))) * np.tanh(np.float32(float_of(a.get("beta", 1.0))) * f32(a["x"]))


@register("sigmoid_hard")
def _sigmoid_hard(a, n):
    return np.clip(np.float32(float_of(a.get("alpha", 0.2))) * f32(a["x"]) + np.float32(float_of(a.get("beta", 0.5))), 0, 1)


@register("prelu")
def _prelu(a, n):
    x = f32(a["x"])
    alpha = f32(a["alpha"]).reshape((1, -1) + (1,) * (x.ndim - 2))
    return np.where(x >= 0, x, alpha * x)


@register("gelu")
def _gelu(a, n):
    x = f32(a["x"])
    mode = a.get("mode", "EXACT")
    if mode == "EXACT":
        return 0.5 * x * (1.0 + erf(x / np.float32(math.sqrt(2.0))))
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + np.tanh(np.float32(math.sqrt(2.0 / math.pi)) * (x + np.float32(0.044715) * x ** 3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x / (1.0 + np.exp(-np.float32(1.702) * x))
    raise variant_error(n, f"mode '{mode}'")


@register("softmax")
def _softmax(a, n):
    x = f32(a["x"])
    axis = int_of(a.get("axis", -1))
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)
