"""The NumPy MIL interpreter (targets/coreml/mil/) against numpy / torch.

Every case is a small MIL function built with coremltools' builder, saved as a
real .mlpackage and read back by ``MILProgram.load``: all fp32 cases are the
functions of one multifunction package (one conversion), the fp16 cases
another, so the module converts a handful of packages in all.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import coremltools as ct
import numpy as np
import pytest
import torch
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Function, Program, types

from core.errors import ArtifactError, BadInputError, UnsupportedOpError
from targets.coreml import compat
from targets.coreml.mil import PROVENANCE, SUPPORTED_OPS, MILProgram

IOS18 = ct.target.iOS18
RNG = np.random.default_rng(0)


def rand(*shape, lo=-2.0, hi=2.0, dtype=np.float32):
    return RNG.uniform(lo, hi, size=shape).astype(dtype)


def t(x):
    return torch.from_numpy(np.ascontiguousarray(x, np.float32))


def n(x):
    return x.detach().numpy()


@dataclass
class Case:
    id: str
    ops: set                       # op types this case must contain
    inputs: dict                   # name -> np.ndarray (float32 / int32)
    build: Callable                # (**vars) -> list of mb outputs
    ref: Callable                  # (**arrays) -> list of np arrays


def _spec(x: np.ndarray, fp16: bool):
    if x.dtype == np.int32:
        return mb.TensorSpec(shape=x.shape, dtype=types.int32)
    return mb.TensorSpec(shape=x.shape, dtype=types.fp16 if fp16 else types.fp32)


# fp16 compute as the Core ML target ships it (fp32 I/O, casts to fp16 around every op, fp16
# weights), without the optimisation passes that would fuse or fold the ops under test
FP16_PASSES = ct.PassPipeline(pass_names=["common::add_fp16_cast", "common::const_elimination"], pipeline_name="fp16")


def _convert(cases: list[Case], out: Path, fp16: bool = False, fp16_io: bool = False) -> MILProgram:
    """One function per case, saved as one package. fp16: fp16 compute; fp16_io: fp16 inputs, no passes."""
    prog = Program()
    for case in cases:
        with Function({k: _spec(v, fp16_io) for k, v in case.inputs.items()}, opset_version=IOS18) as f:
            f.set_outputs(list(case.build(**f.inputs)))
        prog.add_function(case.id, f)
    prog.default_function_name = cases[0].id
    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=IOS18,
                       compute_precision=ct.precision.FLOAT16 if fp16 else ct.precision.FLOAT32,
                       pass_pipeline=FP16_PASSES if fp16 else ct.PassPipeline.EMPTY, skip_model_load=True)
    model.save(str(out))
    return MILProgram.load(out)


def _i32(x):
    return mb.cast(x=x, dtype="int32")


# --- the cases: every op our model's programs use, plus the common rest ---------------------

X234 = rand(2, 3, 4)
Y234 = rand(2, 3, 4)
POS234 = rand(2, 3, 4, lo=0.1, hi=3.0)

CASES: list[Case] = [
    # elementwise binary with broadcasting and size-1 dims
    Case("add", {"add"}, {"x": X234, "y": rand(3, 1)}, lambda x, y: [mb.add(x=x, y=y)], lambda x, y: [x + y]),
    Case("sub", {"sub"}, {"x": X234, "y": rand(1, 1, 4)}, lambda x, y: [mb.sub(x=x, y=y)], lambda x, y: [x - y]),
    Case("mul", {"mul"}, {"x": X234, "y": Y234}, lambda x, y: [mb.mul(x=x, y=y), mb.mul(x=x, y=0.5)],
         lambda x, y: [x * y, x * 0.5]),
    Case("real_div", {"real_div"}, {"x": X234, "y": POS234}, lambda x, y: [mb.real_div(x=x, y=y)], lambda x, y: [x / y]),
    Case("pow", {"pow"}, {"x": POS234}, lambda x: [mb.pow(x=x, y=2.0), mb.pow(x=x, y=-0.5)],
         lambda x: [x ** 2, x ** -0.5]),
    Case("max_min", {"maximum", "minimum"}, {"x": X234, "y": Y234},
         lambda x, y: [mb.maximum(x=x, y=y), mb.minimum(x=x, y=y)], lambda x, y: [np.maximum(x, y), np.minimum(x, y)]),
    Case("floor_div_mod", {"floor_div", "mod"}, {"x": X234 * 3, "y": POS234},
         lambda x, y: [mb.floor_div(x=x, y=y), mb.mod(x=x, y=y)],
         lambda x, y: [n(torch.floor_divide(t(x), t(y))), n(torch.remainder(t(x), t(y)))]),
    Case("compare", {"less_equal", "greater_equal", "less", "greater", "equal", "not_equal", "cast"},
         {"x": np.array([[1, 2, 3, 4]], np.int32), "y": np.array([[3], [2]], np.int32)},
         lambda x, y: [_i32(mb.less_equal(x=x, y=y)), _i32(mb.greater_equal(x=x, y=y)), _i32(mb.less(x=x, y=y)),
                       _i32(mb.greater(x=x, y=y)), _i32(mb.equal(x=x, y=y)), _i32(mb.not_equal(x=x, y=y))],
         lambda x, y: [(x <= y), (x >= y), (x < y), (x > y), (x == y), (x != y)]),
    Case("logical", {"logical_and", "logical_or", "logical_xor", "logical_not"}, {"x": X234, "y": Y234},
         lambda x, y: [_i32(mb.logical_and(x=mb.greater(x=x, y=0.0), y=mb.greater(x=y, y=0.0))),
                       _i32(mb.logical_or(x=mb.greater(x=x, y=0.0), y=mb.greater(x=y, y=0.0))),
                       _i32(mb.logical_xor(x=mb.greater(x=x, y=0.0), y=mb.greater(x=y, y=0.0))),
                       _i32(mb.logical_not(x=mb.greater(x=x, y=0.0)))],
         lambda x, y: [(x > 0) & (y > 0), (x > 0) | (y > 0), (x > 0) ^ (y > 0), ~(x > 0)]),
    # unary
    Case("trig", {"cos", "sin", "tanh", "exp", "abs"}, {"x": X234},
         lambda x: [mb.cos(x=x), mb.sin(x=x), mb.tanh(x=x), mb.exp(x=x), mb.abs(x=x)],
         lambda x: [np.cos(x), np.sin(x), np.tanh(x), np.exp(x), np.abs(x)]),
    Case("rounding", {"floor", "ceil", "round", "sign"}, {"x": X234 * 3},
         lambda x: [mb.floor(x=x), mb.ceil(x=x), mb.round(x=x), mb.sign(x=x)],
         lambda x: [np.floor(x), np.ceil(x), np.round(x), np.sign(x)]),
    Case("roots", {"sqrt", "rsqrt", "log", "inverse", "square"}, {"x": POS234},
         lambda x: [mb.sqrt(x=x), mb.rsqrt(x=x), mb.rsqrt(x=x, epsilon=0.5), mb.log(x=x), mb.inverse(x=x),
                    mb.square(x=x)],
         lambda x: [np.sqrt(x), 1 / np.sqrt(x + 1e-12), 1 / np.sqrt(x + 0.5), np.log(x), 1 / (x + 1e-4), x * x]),
    Case("activations", {"relu", "sigmoid", "silu", "softplus", "erf", "leaky_relu", "elu", "clip"}, {"x": X234 * 2},
         lambda x: [mb.relu(x=x), mb.sigmoid(x=x), mb.silu(x=x), mb.softplus(x=x), mb.erf(x=x),
                    mb.leaky_relu(x=x, alpha=0.1), mb.elu(x=x, alpha=0.7), mb.clip(x=x, alpha=-0.5, beta=1.25)],
         lambda x: [n(torch.relu(t(x))), n(torch.sigmoid(t(x))), n(torch.nn.functional.silu(t(x))),
                    n(torch.nn.functional.softplus(t(x))), n(torch.erf(t(x))),
                    n(torch.nn.functional.leaky_relu(t(x), 0.1)), n(torch.nn.functional.elu(t(x), 0.7)),
                    np.clip(x, -0.5, 1.25)]),
    Case("gelu", {"gelu"}, {"x": X234 * 2},
         lambda x: [mb.gelu(x=x), mb.gelu(x=x, mode="TANH_APPROXIMATION"), mb.gelu(x=x, mode="SIGMOID_APPROXIMATION")],
         lambda x: [n(torch.nn.functional.gelu(t(x))), n(torch.nn.functional.gelu(t(x), approximate="tanh")),
                    x * n(torch.sigmoid(1.702 * t(x)))]),
    Case("softmax", {"softmax"}, {"x": rand(2, 1, 5) * 4},
         lambda x: [mb.softmax(x=x, axis=-1), mb.softmax(x=x, axis=0), mb.softmax(x=x, axis=1)],
         lambda x: [n(torch.softmax(t(x), -1)), n(torch.softmax(t(x), 0)), n(torch.softmax(t(x), 1))]),
    Case("more_unary", {"atan", "exp2", "relu6", "softsign", "threshold", "sigmoid_hard", "clamped_relu",
                        "linear_activation", "scaled_tanh", "prelu", "identity"}, {"x": rand(1, 3, 2, 4) * 4},
         lambda x: [mb.atan(x=x), mb.exp2(x=x), mb.relu6(x=x), mb.softsign(x=x), mb.threshold(x=x, alpha=0.3),
                    mb.sigmoid_hard(x=x, alpha=0.3, beta=0.4), mb.clamped_relu(x=x, alpha=0.2, beta=1.5),
                    mb.linear_activation(x=x, alpha=1.5, beta=-0.5), mb.scaled_tanh(x=x, alpha=2.0, beta=0.5),
                    mb.prelu(x=x, alpha=np.array([0.1, 0.2, 0.3], np.float32)), mb.identity(x=x)],
         lambda x: [np.arctan(x), np.exp2(x), np.clip(x, 0, 6), x / (1 + np.abs(x)), np.maximum(x, 0.3),
                    np.clip(0.3 * x + 0.4, 0, 1), np.minimum(np.where(x >= 0, x, 0.2 * x), 1.5), 1.5 * x - 0.5,
                    2.0 * np.tanh(0.5 * x), np.where(x >= 0, x, np.array([0.1, 0.2, 0.3]).reshape(1, 3, 1, 1) * x), x]),
    Case("int_arith", {"floor_div", "mod", "add", "real_div"}, {"x": np.array([[7, -7, 9, 0]], np.int32),
                                                             "y": np.array([[2, 2, -4, 3]], np.int32)},
         lambda x, y: [mb.floor_div(x=x, y=y), mb.mod(x=x, y=y), mb.add(x=x, y=y), mb.real_div(x=x, y=y)],
         lambda x, y: [np.floor_divide(x, y), np.mod(x, y), x + y, np.trunc(x / y).astype(np.int32)]),
    Case("more_reduce", {"reduce_l1_norm", "reduce_l2_norm", "reduce_sum_square", "reduce_log_sum_exp",
                         "reduce_log_sum"}, {"x": X234},
         lambda x: [mb.reduce_l1_norm(x=x, axes=[1]), mb.reduce_l2_norm(x=x, axes=[-1], keep_dims=True),
                    mb.reduce_sum_square(x=x, axes=[0, 1]), mb.reduce_log_sum_exp(x=x, axes=[2]),
                    mb.reduce_log_sum(x=mb.abs(x=x), axes=[1], keep_dims=True)],
         lambda x: [np.abs(x).sum(1), np.sqrt((x * x).sum(-1, keepdims=True)), (x * x).sum((0, 1)),
                    n(torch.logsumexp(t(x), 2)), np.log(np.abs(x).sum(1, keepdims=True))]),
    Case("more_layout", {"reverse", "flatten2d", "one_hot", "non_zero"},
         {"x": X234, "i": np.array([2, 0, 1, 2], np.int32)},
         lambda x, i: [mb.reverse(x=x, axes=[0, -1]), mb.flatten2d(x=x, axis=2),
                       mb.one_hot(indices=i, one_hot_vector_size=3, axis=-1, on_value=2.0, off_value=-1.0),
                       mb.non_zero(x=i)],
         lambda x, i: [x[::-1, :, ::-1], x.reshape(6, 4), np.where(np.eye(3)[i] > 0, 2.0, -1.0),
                       np.array([[0], [2], [3]])]),
    # reductions, keep_dims both ways, negative axes, all axes
    Case("reduce", {"reduce_sum", "reduce_mean", "reduce_max", "reduce_min", "reduce_prod"}, {"x": X234},
         lambda x: [mb.reduce_sum(x=x, axes=[-1], keep_dims=True), mb.reduce_sum(x=x, axes=[0, 2]),
                    mb.reduce_mean(x=x, axes=[1], keep_dims=True), mb.reduce_mean(x=x, axes=[-1, -3]),
                    mb.reduce_max(x=x, axes=[2]), mb.reduce_min(x=x, axes=[0], keep_dims=True),
                    mb.reduce_prod(x=x, axes=[1]), mb.reduce_sum(x=x, keep_dims=False)],
         lambda x: [x.sum(-1, keepdims=True), x.sum((0, 2)), x.mean(1, keepdims=True), x.mean((0, 2)), x.max(2),
                    x.min(0, keepdims=True), x.prod(1), x.sum()]),
    Case("reduce_int", {"reduce_sum"}, {"x": np.arange(24, dtype=np.int32).reshape(3, 1, 8)},
         lambda x: [mb.reduce_sum(x=x, axes=[0], keep_dims=False)], lambda x: [x.sum(0)]),
    Case("argmax", {"reduce_argmax", "reduce_argmin"}, {"x": X234},
         lambda x: [mb.reduce_argmax(x=x, axis=-1), mb.reduce_argmin(x=x, axis=1, keep_dims=True)],
         lambda x: [x.argmax(-1), x.argmin(1)[:, None, :]]),
    # linear algebra
    Case("linear", {"linear"}, {"x": rand(1, 3, 8)},
         lambda x: [mb.linear(x=x, weight=rand(5, 8), bias=rand(5)), mb.linear(x=x, weight=rand(1, 8))],
         None),
    Case("matmul", {"matmul"}, {"x": rand(2, 3, 4), "y": rand(2, 5, 4), "z": rand(4, 6)},
         lambda x, y, z: [mb.matmul(x=x, y=y, transpose_y=True), mb.matmul(x=y, y=x, transpose_x=False, transpose_y=True),
                          mb.matmul(x=x, y=z), mb.matmul(x=z, y=x, transpose_x=True, transpose_y=True)],
         lambda x, y, z: [x @ y.transpose(0, 2, 1), y @ x.transpose(0, 2, 1), x @ z,
                          z.T @ x.transpose(0, 2, 1)]),
    Case("conv1d", {"conv"}, {"x": rand(1, 3, 11)}, None, None),
    Case("conv2d", {"conv"}, {"x": rand(1, 4, 7, 6)}, None, None),
    Case("pool", {"max_pool", "avg_pool"}, {"x": rand(1, 2, 7, 6)},
         lambda x: [mb.max_pool(x=x, kernel_sizes=[3, 2], strides=[2, 2], pad_type="valid"),
                    mb.max_pool(x=x, kernel_sizes=[3, 3], strides=[1, 1], pad_type="custom", pad=[1, 1, 1, 1]),
                    mb.avg_pool(x=x, kernel_sizes=[3, 3], strides=[2, 1], pad_type="custom", pad=[1, 1, 1, 1],
                                exclude_padding_from_average=True),
                    mb.avg_pool(x=x, kernel_sizes=[3, 3], strides=[2, 1], pad_type="custom", pad=[1, 1, 1, 1],
                                exclude_padding_from_average=False)],
         lambda x: [n(torch.nn.functional.max_pool2d(t(x), (3, 2), (2, 2))),
                    n(torch.nn.functional.max_pool2d(t(x), 3, 1, padding=1)),
                    n(torch.nn.functional.avg_pool2d(t(x), 3, (2, 1), padding=1, count_include_pad=False)),
                    n(torch.nn.functional.avg_pool2d(t(x), 3, (2, 1), padding=1, count_include_pad=True))]),
    Case("conv_transpose", {"conv_transpose"}, {"x": rand(1, 4, 5)}, None, None),
    Case("layer_norm", {"layer_norm"}, {"x": rand(2, 3, 8) * 3 + 1},
         None, None),
    Case("norms", {"batch_norm", "instance_norm", "l2_norm"}, {"x": rand(2, 3, 4, 5)}, None, None),
    Case("sdpa", {"scaled_dot_product_attention"}, {"q": rand(1, 2, 3, 8), "k": rand(1, 2, 5, 8), "v": rand(1, 2, 5, 4),
                                                     "m": rand(3, 5) * 3},
         lambda q, k, v, m: [mb.scaled_dot_product_attention(query=q, key=k, value=v),
                             mb.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=mb.greater(x=m, y=-1.0)),
                             mb.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=m)],
         lambda q, k, v, m: [n(torch.nn.functional.scaled_dot_product_attention(t(q), t(k), t(v))),
                             n(torch.nn.functional.scaled_dot_product_attention(t(q), t(k), t(v), attn_mask=torch.from_numpy(m > -1))),
                             n(torch.nn.functional.scaled_dot_product_attention(t(q), t(k), t(v), attn_mask=t(m)))]),
    # layout
    Case("reshape", {"reshape"}, {"x": X234},
         lambda x: [mb.reshape(x=x, shape=[4, -1]), mb.reshape(x=x, shape=[4, 0, 0, -1]), mb.reshape(x=x, shape=[1, 0, -1])],
         lambda x: [x.reshape(4, -1), x.reshape(4, 2, 3, 1), x.reshape(1, 3, 8)]),
    Case("transpose", {"transpose"}, {"x": X234},
         lambda x: [mb.transpose(x=x, perm=[2, 0, 1]), mb.transpose(x=x, perm=[0, 2, 1])],
         lambda x: [x.transpose(2, 0, 1), x.transpose(0, 2, 1)]),
    Case("squeeze_expand", {"squeeze", "expand_dims"}, {"x": rand(1, 3, 1, 2)},
         lambda x: [mb.squeeze(x=x, axes=[0]), mb.squeeze(x=x, axes=[-2]), mb.squeeze(x=x),
                    mb.expand_dims(x=x, axes=[-1]), mb.expand_dims(x=mb.squeeze(x=x), axes=[0, -2])],
         lambda x: [x[0], x[:, :, 0], x.reshape(3, 2), x[..., None], x.reshape(1, 3, 1, 2)]),
    Case("concat", {"concat"}, {"x": rand(2, 3), "y": rand(2, 3), "z": rand(2, 1)},
         lambda x, y, z: [mb.concat(values=[x, y, z], axis=-1), mb.concat(values=[x, y], axis=0),
                          mb.concat(values=[x, y], axis=0, interleave=True), mb.concat(values=[x, y], axis=1, interleave=True)],
         lambda x, y, z: [np.concatenate([x, y, z], -1), np.concatenate([x, y], 0),
                          np.stack([x, y], 1).reshape(4, 3), np.stack([x, y], 2).reshape(2, 6)]),
    Case("stack", {"stack"}, {"x": rand(2, 3), "y": rand(2, 3)},
         lambda x, y: [mb.stack(values=[x, y], axis=-1), mb.stack(values=[x, y], axis=0)],
         lambda x, y: [np.stack([x, y], -1), np.stack([x, y], 0)]),
    Case("split", {"split"}, {"x": rand(2, 7)},
         lambda x: list(mb.split(x=x, split_sizes=[2, 5], axis=-1)) + list(mb.split(x=x, num_splits=2, axis=0)),
         lambda x: [x[:, :2], x[:, 2:], x[:1], x[1:]]),
    Case("tile", {"tile"}, {"x": rand(2, 1, 3)},
         lambda x: [mb.tile(x=x, reps=[1, 4, 2]), mb.tile(x=x, reps=[2, 1, 1])],
         lambda x: [np.tile(x, (1, 4, 2)), np.tile(x, (2, 1, 1))]),
    Case("slice_by_index", {"slice_by_index"}, {"x": rand(3, 5, 6), "p": np.array([2], np.int32)},
         lambda x, p: [mb.slice_by_index(x=x, begin=[0, 1, 0], end=[3, 4, 6]),
                       mb.slice_by_index(x=x, begin=[1, 0, -3], end=[0, -1, 0], begin_mask=[False, True, False],
                                         end_mask=[True, False, True]),
                       mb.slice_by_index(x=x, begin=[0, 4, 0], end=[3, 0, 6], stride=[2, -2, 3],
                                         end_mask=[False, True, False]),
                       mb.slice_by_index(x=x, begin=[1, 0, -1], end=[2, 5, 0], squeeze_mask=[True, False, True]),
                       mb.slice_by_index(x=p, begin=[0], end=[1], squeeze_mask=[True]),
                       mb.slice_by_index(x=x, begin=mb.concat(values=[[0], p, [0]], axis=0),
                                         end=mb.concat(values=[[3], mb.add(x=p, y=2), [6]], axis=0))],
         lambda x, p: [x[0:3, 1:4, 0:6], x[1:, :-1, -3:], x[0:3:2, 4::-2, 0:6:3], x[1, :, -1], p[0], x[:, 2:4, :]]),
    Case("slice_by_size", {"slice_by_size"}, {"x": rand(3, 5, 6)},
         lambda x: [mb.slice_by_size(x=x, begin=[1, 0, 2], size=[2, -1, 3])], lambda x: [x[1:3, :, 2:5]]),
    Case("slice_update", {"slice_update"}, {"x": rand(1, 2, 8, 4), "u": rand(1, 2, 3, 4), "s": rand(2, 4),
                                             "p": np.array([5], np.int32)},
         lambda x, u, s, p: [
             mb.slice_update(x=x, update=u, begin=mb.concat(values=[[0, 0], p, [0]], axis=0),
                             end=mb.concat(values=[[1, 2], mb.add(x=p, y=3), [4]], axis=0)),
             mb.slice_update(x=x, update=s, begin=[0, 0, 7, 0], end=[1, 2, 8, 4], squeeze_mask=[True, False, True, False]),
             mb.slice_update(x=x, update=mb.slice_by_index(x=u, begin=[0, 0, 0, 0], end=[1, 2, 2, 2]),
                             begin=[0, 0, 1, 0], end=[1, 2, 5, 4], stride=[1, 1, 2, 2], end_mask=[True, True, False, True])],
         None),
    Case("pad", {"pad"}, {"x": rand(1, 2, 3, 4)},
         lambda x: [mb.pad(x=x, pad=[1, 2, 0, 1], mode="constant", constant_val=0.5),
                    mb.pad(x=x, pad=[1, 1, 2, 1], mode="reflect"), mb.pad(x=x, pad=[0, 0, 1, 1, 2, 0], mode="replicate")],
         lambda x: [np.pad(x, [(0, 0), (0, 0), (1, 2), (0, 1)], constant_values=0.5),
                    np.pad(x, [(0, 0), (0, 0), (1, 1), (2, 1)], mode="reflect"),
                    np.pad(x, [(0, 0), (0, 0), (1, 1), (2, 0)], mode="edge")]),
    Case("shape_fill", {"shape", "fill_like", "fill", "select"}, {"x": X234, "c": rand(3, 1)},
         lambda x, c: [mb.shape(x=x), mb.fill_like(ref_tensor=x, value=-2.5),
                       mb.fill(shape=mb.shape(x=c), value=3.0),
                       mb.select(cond=mb.greater(x=c, y=0.0), a=x, b=mb.fill_like(ref_tensor=x, value=-1e4))],
         lambda x, c: [np.array([2, 3, 4]), np.full(x.shape, -2.5), np.full(c.shape, 3.0),
                       np.where(c > 0, x, -1e4)]),
    Case("cast", {"cast"}, {"x": X234 * 3, "i": np.array([[-3, 0, 7]], np.int32)},
         lambda x, i: [mb.cast(x=x, dtype="int32"), mb.cast(x=i, dtype="fp32"), mb.cast(x=mb.cast(x=x, dtype="fp16"), dtype="fp32"),
                       mb.cast(x=mb.cast(x=i, dtype="bool"), dtype="int32")],
         lambda x, i: [np.trunc(x), i.astype(np.float32), x.astype(np.float16).astype(np.float32), (i != 0)]),
    Case("range_cumsum_band", {"range_1d", "cumsum", "band_part"}, {"x": X234, "p": np.array([7], np.int32)},
         lambda x, p: [mb.range_1d(start=1, end=mb.slice_by_index(x=p, begin=[0], end=[1], squeeze_mask=[True]), step=2),
                       mb.cumsum(x=x, axis=1), mb.cumsum(x=x, axis=-1, exclusive=True, reverse=True),
                       mb.band_part(x=x, lower=1, upper=0)],
         lambda x, p: [np.arange(1, 7, 2), np.cumsum(x, 1), np.flip(np.cumsum(np.flip(x, -1), -1), -1) - x,
                       np.tril(np.triu(x, -1), 0)]),
    Case("topk_argsort", {"topk", "argsort"}, {"x": rand(3, 6)},
         lambda x: list(mb.topk(x=x, k=2, axis=-1)) + list(mb.topk(x=x, k=1, axis=0, ascending=True)) + [mb.argsort(x=x, axis=1)],
         lambda x: [np.sort(x, -1)[:, ::-1][:, :2], np.argsort(-x, -1)[:, :2], x.min(0, keepdims=True),
                    x.argmin(0)[None], np.argsort(-x, 1)]),
    # gather / scatter, negative indices, batch_dims
    Case("gather", {"gather"}, {"x": rand(3, 5, 4), "i": np.array([[3, 0], [-1, 2]], np.int32),
                                 "b": np.array([[1, 3], [0, 0], [4, 2]], np.int32)},
         lambda x, i, b: [mb.gather(x=x, indices=i, axis=1), mb.gather(x=x, indices=mb.slice_by_index(x=i, begin=[0, 0], end=[2, 1]), axis=-1),
                          mb.gather(x=x, indices=b, axis=1, batch_dims=1)],
         lambda x, i, b: [np.take(x, np.where(i < 0, i + 5, i), axis=1), np.take(x, i[:, :1], axis=-1),
                          np.stack([x[k][b[k]] for k in range(3)])]),
    Case("gather_along_nd", {"gather_along_axis", "gather_nd"}, {"x": rand(3, 4), "i": np.array([[0, 3], [2, 2], [1, 0]], np.int32)},
         lambda x, i: [mb.gather_along_axis(x=x, indices=i, axis=1), mb.gather_nd(x=x, indices=mb.slice_by_index(x=i, begin=[0, 0], end=[3, 1]))],
         lambda x, i: [np.take_along_axis(x, i, 1), x[i[:, :1][:, 0]]]),
    Case("scatter", {"scatter", "scatter_along_axis", "scatter_nd"},
         {"d": rand(4, 3), "u": rand(2, 3), "v": rand(4, 1), "i": np.array([3, 1], np.int32), "j": np.array([[2], [0], [1], [2]], np.int32)},
         lambda d, u, v, i, j: [mb.scatter(data=d, indices=i, updates=u, axis=0, mode="update"),
                                mb.scatter(data=d, indices=i, updates=u, axis=0, mode="add"),
                                mb.scatter_along_axis(data=d, indices=j, updates=v, axis=1, mode="update"),
                                mb.scatter_nd(data=d, indices=mb.expand_dims(x=i, axes=[-1]), updates=u, mode="update")],
         None),
    Case("quantize_dequantize", {"quantize", "dequantize"}, {"x": rand(2, 3, 4) * 2},
         lambda x: [mb.dequantize(input=mb.quantize(input=x, scale=np.float32(0.03), output_dtype="int8"), scale=np.float32(0.03)),
                    mb.dequantize(input=mb.quantize(input=x, scale=np.array([0.02, 0.05, 0.1], np.float32),
                                                    zero_point=np.array([3, -2, 0], np.int8), axis=1, output_dtype="int8"),
                                  scale=np.array([0.02, 0.05, 0.1], np.float32), zero_point=np.array([3, -2, 0], np.int8), axis=1),
                    mb.dequantize(input=mb.quantize(input=x, scale=np.float32(0.01), zero_point=np.uint8(128),
                                                    output_dtype="uint8"), scale=np.float32(0.01), zero_point=np.uint8(128))],
         None),
]

BY_ID = {c.id: c for c in CASES}


# cases with constants: fix the constants first, then define both sides from them
W5, B5, W1 = rand(5, 8), rand(5), rand(1, 8)
BY_ID["linear"].build = lambda x: [mb.linear(x=x, weight=W5, bias=B5), mb.linear(x=x, weight=W1)]
BY_ID["linear"].ref = lambda x: [x @ W5.T + B5, x @ W1.T]

CW1, CB1 = rand(6, 3, 3), rand(6)
CW1G = rand(4, 1, 2)
BY_ID["conv1d"].build = lambda x: [
    mb.conv(x=x, weight=CW1, bias=CB1),
    mb.conv(x=x, weight=CW1, strides=[2], pad_type="same"),
    mb.conv(x=x, weight=CW1, pad_type="custom", pad=[2, 1], dilations=[2]),
    mb.conv(x=mb.slice_by_index(x=x, begin=[0, 0, 0], end=[1, 2, 11]), weight=CW1G, groups=2, strides=[3]),
]
BY_ID["conv1d"].ref = lambda x: [
    n(torch.nn.functional.conv1d(t(x), t(CW1), t(CB1))),
    n(torch.nn.functional.conv1d(torch.nn.functional.pad(t(x), (1, 1)), t(CW1), stride=2)),
    n(torch.nn.functional.conv1d(torch.nn.functional.pad(t(x), (2, 1)), t(CW1), dilation=2)),
    n(torch.nn.functional.conv1d(t(x[:, :2]), t(CW1G), groups=2, stride=3)),
]
CW2, CB2, CW2G = rand(5, 4, 3, 2), rand(5), rand(4, 1, 1, 1)
BY_ID["conv2d"].build = lambda x: [
    mb.conv(x=x, weight=CW2, bias=CB2, strides=[2, 1], pad_type="valid"),
    mb.conv(x=x, weight=CW2, pad_type="same"),
    mb.conv(x=x, weight=CW2, pad_type="same_lower", strides=[2, 2]),
    mb.conv(x=x, weight=CW2G, groups=4, pad_type="custom", pad=[1, 0, 0, 2]),
]
BY_ID["conv2d"].ref = lambda x: [
    n(torch.nn.functional.conv2d(t(x), t(CW2), t(CB2), stride=(2, 1))),
    n(torch.nn.functional.conv2d(torch.nn.functional.pad(t(x), (0, 1, 1, 1)), t(CW2))),
    # same_lower: output ceil(7/2)=4, ceil(6/2)=3 -> total pads H=(4-1)*2+3-7=2 -> (1,1); W=(3-1)*2+2-6=0
    n(torch.nn.functional.conv2d(torch.nn.functional.pad(t(x), (0, 0, 1, 1)), t(CW2), stride=2)),
    n(torch.nn.functional.conv2d(torch.nn.functional.pad(t(x), (0, 2, 1, 0)), t(CW2G), groups=4)),
]
TW, TB = rand(4, 3, 3), rand(3)
BY_ID["conv_transpose"].build = lambda x: [
    mb.conv_transpose(x=x, weight=TW, bias=TB, strides=[2]),
    mb.conv_transpose(x=x, weight=TW, pad_type="custom", pad=[1, 1], strides=[2], dilations=[2]),
]
BY_ID["conv_transpose"].ref = lambda x: [
    n(torch.nn.functional.conv_transpose1d(t(x), t(TW), t(TB), stride=2)),
    n(torch.nn.functional.conv_transpose1d(t(x), t(TW), stride=2, padding=1, dilation=2)),
]
LG, LB = rand(8), rand(8)
LG2 = rand(3, 8)
BY_ID["layer_norm"].build = lambda x: [
    mb.layer_norm(x=x, axes=[-1], gamma=LG, beta=LB, epsilon=1e-5),
    mb.layer_norm(x=x, axes=[1, 2], gamma=LG2, epsilon=1e-3),
    mb.layer_norm(x=x, axes=[-1]),
]
BY_ID["layer_norm"].ref = lambda x: [
    n(torch.nn.functional.layer_norm(t(x), (8,), t(LG), t(LB), 1e-5)),
    n(torch.nn.functional.layer_norm(t(x), (3, 8), t(LG2), None, 1e-3)),
    n(torch.nn.functional.layer_norm(t(x), (8,))),
]
BM, BV, BG, BB = rand(3), rand(3, lo=0.5, hi=2), rand(3), rand(3)
BY_ID["norms"].build = lambda x: [
    mb.batch_norm(x=x, mean=BM, variance=BV, gamma=BG, beta=BB, epsilon=1e-4),
    mb.instance_norm(x=x, gamma=BG, beta=BB, epsilon=1e-5),
    mb.l2_norm(x=x, epsilon=1e-6),
]
BY_ID["norms"].ref = lambda x: [
    n(torch.nn.functional.batch_norm(t(x), t(BM), t(BV), t(BG), t(BB), eps=1e-4)),
    n(torch.nn.functional.instance_norm(t(x), weight=t(BG), bias=t(BB), eps=1e-5)),
    x / np.sqrt((x * x).sum((1, 2, 3), keepdims=True) + 1e-6),
]


def _slice_update_ref(x, u, s, p):
    a = x.copy()
    a[:, :, 5:8, :] = u
    b = x.copy()
    b[0, :, 7, :] = s
    c = x.copy()
    c[:, :, 1:5:2, 0::2] = u[:, :, :2, :2]
    return [a, b, c]


BY_ID["slice_update"].ref = _slice_update_ref


def _scatter_ref(d, u, v, i, j):
    a = d.copy()
    a[i] = u
    b = d.copy()
    np.add.at(b, i, u)
    c = d.copy()
    np.put_along_axis(c, j, v, axis=1)
    e = d.copy()
    e[i] = u
    return [a, b, c, e]


BY_ID["scatter"].ref = _scatter_ref


def _qdq_ref(x):
    q1 = np.clip(np.round(x / 0.03), -128, 127) * 0.03
    s = np.array([0.02, 0.05, 0.1], np.float32).reshape(1, 3, 1)
    z = np.array([3, -2, 0], np.float32).reshape(1, 3, 1)
    q2 = (np.clip(np.round(x / s) + z, -128, 127) - z) * s
    q3 = (np.clip(np.round(x / 0.01) + 128, 0, 255) - 128) * 0.01
    return [q1, q2, q3]


BY_ID["quantize_dequantize"].ref = _qdq_ref


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mil")


@pytest.fixture(scope="module")
def fp32_prog(work) -> MILProgram:
    return _convert(CASES, work / "fp32_cases.mlpackage", fp16=False)


def _close(got: np.ndarray, want: np.ndarray, rtol: float, what: str) -> None:
    want = np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    if want.dtype == np.bool_ or np.issubdtype(want.dtype, np.integer):
        np.testing.assert_array_equal(got, want.astype(got.dtype), err_msg=what)
        return
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max())
    assert err <= rtol * scale, f"{what}: max abs {err:.3g} > {rtol:g} x scale {scale:.3g}"


# --- per-op tests -----------------------------------------------------------------------------


@pytest.mark.parametrize("case_id", [c.id for c in CASES])
def test_op_matches_reference_fp32(fp32_prog, case_id):
    case = BY_ID[case_id]
    assert case.ops <= fp32_prog.op_types(case_id), f"{case_id}: program lost ops {case.ops - fp32_prog.op_types(case_id)}"
    out = fp32_prog.run(case.inputs, function=case_id)
    want = case.ref(**case.inputs)
    assert len(out) == len(want)
    for k, (name, got) in enumerate(out.items()):
        _close(got, want[k], 1e-5, f"{case_id} output {k} ({name})")


FP16_IDS = ["add", "mul", "pow", "trig", "roots", "activations", "gelu", "softmax", "reduce", "linear", "matmul",
            "conv1d", "conv2d", "layer_norm", "sdpa", "reshape", "concat", "split", "slice_by_index", "slice_update",
            "shape_fill", "gather", "quantize_dequantize"]


@pytest.fixture(scope="module")
def fp16_prog(work) -> MILProgram:
    return _convert([BY_ID[i] for i in FP16_IDS], work / "fp16_cases.mlpackage", fp16=True)


@pytest.mark.parametrize("case_id", FP16_IDS)
def test_op_matches_reference_fp16(fp16_prog, case_id):
    """fp16 compute: every op's output is rounded to fp16; results stay within fp16 tolerance of fp32 math."""
    case = BY_ID[case_id]
    assert case.ops - {"shape", "fill"} <= fp16_prog.op_types(case_id)  # static shapes are folded by const_elimination
    assert "cast" in fp16_prog.op_types(case_id)
    out = fp16_prog.run(case.inputs, function=case_id)
    want = case.ref(**case.inputs)
    assert len(out) == len(want)
    for k, (name, got) in enumerate(out.items()):
        _close(got, want[k], 1e-2, f"{case_id} fp16 output {k} ({name})")


def test_fp16_rounds_every_op_output(fp16_prog):
    """add then mul in fp16: the intermediate is rounded to fp16 before the next op, as on device."""
    x = np.array([[1.0, 2048.0, 0.1, 3.0e-5]], np.float16)
    y = np.array([[1e-3, 1.0, 0.2, 3.0e-5]], np.float16)
    prog_dir = fp16_prog.path.parent / "fp16_round.mlpackage"
    case = Case("round_trip", {"add", "mul"}, {"x": x, "y": y},
                lambda x, y: [mb.mul(x=mb.add(x=x, y=y), y=np.float16(3.0))], None)
    prog = _convert([case], prog_dir, fp16_io=True)
    assert prog.inputs() == {"x": ((1, 4), np.dtype(np.float16)), "y": ((1, 4), np.dtype(np.float16))}
    got = prog.run({"x": x, "y": y})
    (out,) = got.values()
    step = (x.astype(np.float32) + y.astype(np.float32)).astype(np.float16)
    want = (step.astype(np.float32) * np.float32(3.0)).astype(np.float16)
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, want)
    # 2048 + 1 is not representable in fp16: the rounded sum (2048) is what gets multiplied
    assert float(out[0, 1]) == 6144.0


def test_default_pipeline_fp16_casts_inputs_and_outputs(work):
    """compute_precision FLOAT16 (what the Core ML target ships): fp32 I/O, casts around fp16 ops."""
    w = rand(16, 32) / 4

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 32))], opset_version=IOS18)
    def prog(x):
        return mb.softmax(x=mb.linear(x=x, weight=w), axis=-1)

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=IOS18,
                       compute_precision=ct.precision.FLOAT16, skip_model_load=True)
    model.save(str(work / "default16.mlpackage"))
    p = MILProgram.load(work / "default16.mlpackage")
    assert "cast" in p.op_types()
    x = rand(2, 32)
    (out,) = p.run({"x": x}).values()
    assert out.dtype == np.float32
    want = n(torch.softmax(t(x) @ t(w).T, -1))
    assert np.abs(out - want).max() < 2e-3
    assert np.abs(out - want).max() > 0  # fp16 was emulated, not skipped


# --- weights, states, multifunction -----------------------------------------------------------


@pytest.mark.parametrize("mode,granularity,dtype", [("linear_symmetric", "per_channel", "int8"),
                                                    ("linear", "per_block", "int8"),
                                                    ("linear_symmetric", "per_block", "int4")])
def test_quantized_weights_match_dequantized_math(work, mode, granularity, dtype):
    """constexpr_blockwise_shift_scale: per-channel / per-block int8, and int4 unpacked from the blob."""
    import coremltools.optimize.coreml as cto

    w, b = rand(24, 40), rand(24)

    @mb.program(input_specs=[mb.TensorSpec(shape=(3, 40))], opset_version=IOS18)
    def prog(x):
        return mb.linear(x=x, weight=w, bias=b)

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=IOS18,
                       compute_precision=ct.precision.FLOAT32, skip_model_load=True)
    extra = {"block_size": 8} if granularity == "per_block" else {}
    cfg = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(
        mode=mode, dtype=dtype, granularity=granularity, weight_threshold=0, **extra))
    q = cto.linear_quantize_weights(model, cfg)
    path = work / f"{dtype}w_{granularity}.mlpackage"
    q.save(str(path))
    p = MILProgram.load(path)
    assert "constexpr_blockwise_shift_scale" in p.op_types()
    # the stored int8 data, scale (and offset), read with coremltools' own MIL loader
    ops = [op for op in compat.mil_program(q).functions["main"].operations if op.op_type == "constexpr_blockwise_shift_scale"]
    assert len(ops) == 1
    data, scale = ops[0].data.val.astype(np.float32), ops[0].scale.val.astype(np.float32)
    offset = ops[0].offset.val.astype(np.float32) if ops[0].offset is not None else np.zeros_like(scale)
    assert types.builtin_to_string(ops[0].data.dtype) == dtype
    assert data.min() < 0 and data.max() <= (7 if dtype == "int4" else 127)
    assert scale.shape == ((24, 1) if granularity == "per_channel" else (24, 5))
    block = 40 // scale.shape[1]
    wq = (data - offset.repeat(block, 1)) * scale.repeat(block, 1)
    assert np.abs(wq - w).max() <= np.abs(scale).max() / 2 + 1e-6
    x = rand(3, 40)
    (out,) = p.run({"x": x}).values()
    np.testing.assert_allclose(out, x @ wq.T + b, atol=1e-5, rtol=1e-5)
    assert np.abs(out - (x @ w.T + b)).max() > 1e-5  # the int8 weights are used, not the float ones


def test_int4_per_block_and_odd_count_per_channel_weights_from_the_blob(work, monkeypatch):
    """int4-weight as the Core ML target writes it: per-block int4 (block 16) for a linear and a matmul, and a
    per-channel int4 weight whose value count is odd (the last byte holds one value), all read from the blob file."""
    import coremltools.optimize.coreml as cto

    w1, w2, w3 = rand(48, 64), rand(64, 32), rand(5, 7)

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 64)), mb.TensorSpec(shape=(2, 7))], opset_version=IOS18)
    def prog(x, y):
        h = mb.linear(x=x, weight=w1)
        return mb.matmul(x=h, y=w2[:48]), mb.linear(x=y, weight=w3)

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=IOS18,
                       compute_precision=ct.precision.FLOAT32, skip_model_load=True)
    block = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=16,
                                        weight_threshold=0)
    channel = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_channel", weight_threshold=0)
    consts = {op.outputs[0].val.shape: op.name for op in compat.mil_program(model).functions["main"].operations
              if op.op_type == "const" and getattr(op.outputs[0].val, "ndim", 0) == 2}
    cfg = cto.OptimizationConfig(op_name_configs={consts[(48, 64)]: block, consts[(48, 32)]: block, consts[(5, 7)]: channel})
    q = cto.linear_quantize_weights(model, cfg)
    path = work / "int4_mixed.mlpackage"
    q.save(str(path))
    ops = [op for op in compat.mil_program(q).functions["main"].operations if op.op_type == "constexpr_blockwise_shift_scale"]
    assert len(ops) == 3 and {types.builtin_to_string(op.data.dtype) for op in ops} == {"int4"}
    deq = {}
    for op in ops:
        data, scale = op.data.val.astype(np.float32), op.scale.val.astype(np.float32)
        reps = [d // s for d, s in zip(data.shape, scale.shape)]
        deq[data.shape] = data * np.kron(scale, np.ones(reps, np.float32))
    assert sorted(op.data.val.size % 2 for op in ops) == [0, 0, 1]  # 35 values: a half-filled last byte
    x, y = rand(2, 64), rand(2, 7)
    a, b = MILProgram.load(path).run({"x": x, "y": y}).values()
    np.testing.assert_allclose(a, (x @ deq[(48, 64)].T) @ deq[(48, 32)], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(b, y @ deq[(5, 7)].T, atol=1e-5, rtol=1e-5)
    assert np.abs(b - y @ w3.T).max() > 1e-3  # the 4-bit values ran, not the float ones

    # every weight past LAZY_BYTES stays in the mapped file, decoded at each read: the same numbers, no
    # decoded weight held by the program (how a 9B package is run)
    from targets.coreml.mil import values
    from targets.coreml.mil.values import Lazy

    monkeypatch.setattr(values, "LAZY_BYTES", 0)
    lazy = MILProgram.load(path)
    consts = lazy._fn(None).consts
    held = [k for k, v in consts.items() if isinstance(v, np.ndarray) and v.size >= 35]
    assert held == [] and sum(isinstance(v, Lazy) for v in consts.values()) >= 3  # the three weights
    for _ in range(2):  # read twice: the file stays mapped after load
        a2, b2 = lazy.run({"x": x, "y": y}).values()
        np.testing.assert_array_equal(a2, a)
        np.testing.assert_array_equal(b2, b)


@pytest.mark.parametrize("low,high,dtype", [(-128, 128, np.int8), (0, 256, np.uint8), (-8, 8, np.int8)])
def test_weight_decompression_through_torch_gives_numpys_values(low, high, dtype):
    """Weights of at least TORCH_CAST_MIN values are decompressed and cast to fp16 by torch (the 9B's speed): the
    values must be NumPy's float32 product rounded to fp16, bit for bit, over the whole fp16 range of scales
    (subnormal products, products that overflow to inf)."""
    from targets.coreml.mil.dtypes import TORCH_CAST_MIN, round_fp16
    from targets.coreml.mil.ops.quant import _blockwise_shift_scale

    rng = np.random.default_rng(0)
    rows, cols, block = 256, 1024, 32
    assert rows * cols >= TORCH_CAST_MIN
    q = rng.integers(low, high, (rows, cols)).astype(dtype)
    scale = (10 ** rng.uniform(-9, 4.7, (rows, cols // block))).astype(np.float16)  # up to 50,000
    got = _blockwise_shift_scale({"data": q, "scale": scale}, None)
    assert got.dtype == np.float16  # the torch path ran
    want = (q.astype(np.float32).reshape(rows, -1, block) * scale.astype(np.float32)[..., None]).reshape(rows, cols)
    with np.errstate(over="ignore"):
        want16 = want.astype(np.float16).astype(np.float32)
    assert np.isinf(want16).any() and (np.abs(want16[want16 != 0]) < 6.1e-5).any()  # overflow and subnormals tested
    np.testing.assert_array_equal(round_fp16(got), want16)

    x = (rng.standard_normal(TORCH_CAST_MIN) * 3e4).astype(np.float32)
    x[:4] = [np.nan, 1e-7, 7e4, -np.inf]
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(round_fp16(x), x.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("nbits,granularity", [(4, "per_tensor"), (3, "per_tensor"), (2, "per_grouped_channel")])
def test_palettized_weights_match_lut_math(work, nbits, granularity):
    """constexpr_lut_to_dense with sub-byte (uint4 / uint3 / uint2) indices unpacked from the weight blob."""
    import coremltools.optimize.coreml as cto

    w = rand(16, 24)

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 24))], opset_version=IOS18)
    def prog(x):
        return mb.linear(x=x, weight=w)

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=IOS18,
                       compute_precision=ct.precision.FLOAT32, skip_model_load=True)
    extra = {"group_size": 4} if granularity == "per_grouped_channel" else {}
    cfg = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(
        nbits=nbits, mode="uniform", granularity=granularity, weight_threshold=0, **extra))
    q = cto.palettize_weights(model, cfg)
    path = work / f"lut{nbits}.mlpackage"
    q.save(str(path))
    p = MILProgram.load(path)
    assert "constexpr_lut_to_dense" in p.op_types()
    (op,) = [o for o in compat.mil_program(q).functions["main"].operations if o.op_type == "constexpr_lut_to_dense"]
    idx, lut = op.indices.val.astype(np.int64), op.lut.val
    assert idx.max() < 2 ** nbits
    rows_per_lut = 16 // lut.shape[0]
    wq = lut[(np.arange(16) // rows_per_lut)[:, None], 0, idx, 0]
    x = rand(2, 24)
    (out,) = p.run({"x": x}).values()
    np.testing.assert_allclose(out, x @ wq.T, atol=1e-5, rtol=1e-5)


def _state_program(op: str):
    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4), dtype=types.fp16),
                             mb.StateTensorSpec(shape=(1, 4), dtype=types.fp16)], opset_version=IOS18)
    def prog(x, cache):
        cur = mb.read_state(input=cache)
        new = mb.add(x=cur, y=x) if op == "add" else mb.add(x=mb.mul(x=cur, y=np.float16(2.0)), y=x)
        return mb.coreml_update_state(state=cache, value=new)

    return prog


def _save_state_model(op: str, path: Path) -> None:
    model = ct.convert(_state_program(op), convert_to="mlprogram", minimum_deployment_target=IOS18,
                       compute_precision=ct.precision.FLOAT16, skip_model_load=True)
    model.save(str(path))


def test_state_persists_across_runs(work):
    path = work / "state.mlpackage"
    _save_state_model("add", path)
    p = MILProgram.load(path)
    assert p.states() == {"cache": ((1, 4), np.dtype(np.float16))}
    assert {"read_state", "write_state"} <= p.op_types()
    state = p.new_state()
    assert state["cache"].dtype == np.float16 and not state["cache"].any()
    x1, x2 = rand(1, 4).astype(np.float16), rand(1, 4).astype(np.float16)
    (o1,) = p.run({"x": x1}, state=state).values()
    np.testing.assert_array_equal(o1, x1)
    np.testing.assert_array_equal(state["cache"], x1)
    (o2,) = p.run({"x": x2}, state=state).values()
    want = (x1.astype(np.float32) + x2.astype(np.float32)).astype(np.float16)
    np.testing.assert_array_equal(o2, want)
    np.testing.assert_array_equal(state["cache"], want)
    # a fresh state starts from zeros again; a run without a state uses a fresh one
    (o3,) = p.run({"x": x2}, state=p.new_state()).values()
    np.testing.assert_array_equal(o3, x2)
    (o4,) = p.run({"x": x2}).values()
    np.testing.assert_array_equal(o4, x2)


def test_multifunction_package_shares_state(work):
    a, b = work / "acc.mlpackage", work / "dbl.mlpackage"
    _save_state_model("add", a)
    _save_state_model("double", b)
    desc = ct.utils.MultiFunctionDescriptor()
    desc.add_function(str(a), src_function_name="main", target_function_name="accumulate")
    desc.add_function(str(b), src_function_name="main", target_function_name="double_add")
    desc.default_function_name = "accumulate"
    out = work / "multi.mlpackage"
    ct.utils.save_multifunction(desc, str(out))
    p = MILProgram.load(out)
    assert sorted(p.functions) == ["accumulate", "double_add"]
    assert p.default_function == "accumulate"
    assert p.states("accumulate") == p.states("double_add")
    state = p.new_state("accumulate")
    x1, x2 = rand(1, 4).astype(np.float16), rand(1, 4).astype(np.float16)
    p.run({"x": x1}, function="accumulate", state=state)
    (o,) = p.run({"x": x2}, function="double_add", state=state).values()
    want = (x1.astype(np.float32) * 2 + x2.astype(np.float32)).astype(np.float16)
    np.testing.assert_allclose(o.astype(np.float32), want.astype(np.float32), atol=2e-3)
    np.testing.assert_array_equal(state["cache"], o)
    (o,) = p.run({"x": x1}, state=state).values()  # default function: accumulate
    np.testing.assert_allclose(o.astype(np.float32), want.astype(np.float32) + x1.astype(np.float32), atol=4e-3)


class _TinyCachedAttention(torch.nn.Module):
    """One attention layer with a KV cache buffer written by a slice at pos[0] (the Core ML target's pattern)."""

    def __init__(self, h: int = 16, max_seq: int = 8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.qkv = torch.nn.Linear(h, 3 * h)
        self.out = torch.nn.Linear(h, h)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.register_buffer("k_cache", torch.zeros(1, max_seq, h, dtype=torch.float16))
        self.register_buffer("v_cache", torch.zeros(1, max_seq, h, dtype=torch.float16))
        self.h, self.max_seq = h, max_seq

    def forward(self, x, pos):
        # x: [1, T, H]; pos: [T]
        q, k, v = self.qkv(x).split(self.h, -1)
        start = pos[0]
        t_ = x.shape[1]
        self.k_cache[:, start:start + t_] = k.half()
        self.v_cache[:, start:start + t_] = v.half()
        keys, values = self.k_cache.float(), self.v_cache.float()
        idx = torch.arange(self.max_seq)
        mask = idx[None, :] <= pos[:, None]
        scores = (q @ keys.transpose(1, 2)) / math.sqrt(self.h)
        scores = torch.where(mask[None], scores, torch.full_like(scores, -1e4))
        return self.out(torch.softmax(scores, -1) @ values)


def test_torch_converted_cached_attention_matches_torch(work):
    """A traced torch layer with a state KV cache (slice write at pos[0]): prefill then decode share the state."""
    ref = _TinyCachedAttention().eval()
    module = _TinyCachedAttention().eval()
    x0 = torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        traced = torch.jit.trace(module, (x0, torch.arange(3, dtype=torch.int32)))
    seq = ct.RangeDim(1, 8, default=3)
    model = ct.convert(
        traced,
        inputs=[ct.TensorType("x", shape=(1, seq, 16), dtype=np.float32), ct.TensorType("pos", shape=(seq,), dtype=np.int32)],
        outputs=[ct.TensorType("y", dtype=np.float32)],
        states=[ct.StateType(wrapped_type=ct.TensorType(shape=(1, 8, 16), dtype=np.float16), name=n_)
                for n_ in ("k_cache", "v_cache")],
        minimum_deployment_target=IOS18, compute_precision=ct.precision.FLOAT32, convert_to="mlprogram",
        skip_model_load=True,
    )
    model.save(str(work / "attn.mlpackage"))
    p = MILProgram.load(work / "attn.mlpackage")
    assert {"read_state", "slice_update", "write_state"} <= p.op_types()
    state = p.new_state()
    steps = [(x0, torch.arange(3)), (torch.randn(1, 1, 16), torch.tensor([3])), (torch.randn(1, 2, 16), torch.tensor([4, 5]))]
    for x, pos in steps:
        with torch.no_grad():
            want = ref(x, pos.int()).numpy()
        got = p.run({"x": x.numpy(), "pos": pos.numpy().astype(np.int32)}, state=state)["y"]
        assert got.shape == want.shape
        assert np.abs(got - want).max() < 1e-5 * max(1.0, float(np.abs(want).max()))
    np.testing.assert_array_equal(state["k_cache"], ref.k_cache.numpy())
    assert p.inputs()["x"] == ((1, None, 16), np.dtype(np.float32))
    with pytest.raises(BadInputError, match="outside the allowed range 1..8"):
        p.run({"x": np.zeros((1, 9, 16), np.float32), "pos": np.arange(9, dtype=np.int32)}, state=state)
    with pytest.raises(BadInputError, match="state 'k_cache' is float32"):
        p.run({"x": x.numpy(), "pos": pos.numpy().astype(np.int32)},
              state={k: v.astype(np.float32) for k, v in state.items()})
    with pytest.raises(BadInputError, match="state 'v_cache'"):
        p.run({"x": x.numpy(), "pos": pos.numpy().astype(np.int32)}, state={"k_cache": state["k_cache"]})


def test_control_flow_cond_and_while_loop(work):
    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3)), mb.TensorSpec(shape=(1,), dtype=types.int32)],
                opset_version=IOS18)
    def prog(x, n):
        pred = mb.greater(x=mb.reduce_sum(x=x), y=0.0)
        y = mb.cond(pred=pred, _true_fn=lambda: mb.mul(x=x, y=2.0), _false_fn=lambda: mb.sub(x=x, y=1.0))

        def cond(i, acc):
            return mb.less(x=i, y=mb.squeeze(x=n))

        def body(i, acc):
            return mb.add(x=i, y=1), mb.add(x=acc, y=x)

        _, acc = mb.while_loop(_cond=cond, _body=body, loop_vars=(np.int32(0), mb.mul(x=x, y=0.0)))
        return y, acc

    ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=IOS18, compute_precision=ct.precision.FLOAT32,
               pass_pipeline=ct.PassPipeline.EMPTY, skip_model_load=True).save(str(work / "cf.mlpackage"))
    p = MILProgram.load(work / "cf.mlpackage")
    assert {"cond", "while_loop"} <= p.op_types()
    x = np.abs(rand(2, 3)) + 0.1
    y, acc = p.run({"x": x, "n": np.array([3], np.int32)}).values()
    np.testing.assert_allclose(y, 2 * x, rtol=1e-6)
    np.testing.assert_allclose(acc, 3 * x, rtol=1e-6)
    y, acc = p.run({"x": -x, "n": np.array([0], np.int32)}).values()
    np.testing.assert_allclose(y, -x - 1, rtol=1e-6)
    np.testing.assert_array_equal(acc, np.zeros_like(x))


# --- failures ---------------------------------------------------------------------------------


def _copy(src: Path, dest: Path) -> Path:
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest)
    return dest


@pytest.fixture(scope="module")
def small_pkg(work) -> Path:
    w = rand(8, 6)

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 6))], opset_version=IOS18)
    def prog(x):
        return mb.reduce_sum(x=mb.linear(x=x, weight=w), axes=[-1])

    path = work / "small.mlpackage"
    ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=IOS18,
               compute_precision=ct.precision.FLOAT32, skip_model_load=True).save(str(path))
    return path


def test_unknown_op_fails_at_load_naming_it(small_pkg, work):
    pkg = _copy(small_pkg, work / "unknown_op.mlpackage")
    model_file = pkg / "Data" / "com.apple.CoreML" / "model.mlmodel"
    spec = compat.model_pb2().Model()
    spec.ParseFromString(model_file.read_bytes())
    block = spec.mlProgram.functions["main"].block_specializations["CoreML8"]
    op = next(o for o in block.operations if o.type == "reduce_sum")
    op.type = "frobnicate_tensor"
    model_file.write_bytes(spec.SerializeToString())
    with pytest.raises(UnsupportedOpError) as err:
        MILProgram.load(pkg)
    msg = str(err.value)
    assert "'frobnicate_tensor'" in msg and "function 'main'" in msg and op.outputs[0].name in msg
    assert "\n" not in msg


def test_truncated_weight_file_is_an_artifact_error(small_pkg, work):
    pkg = _copy(small_pkg, work / "truncated.mlpackage")
    weights = pkg / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 40])
    with pytest.raises(ArtifactError, match="truncated"):
        MILProgram.load(pkg)
    weights.write_bytes(data[:32])
    with pytest.raises(ArtifactError, match="truncated"):
        MILProgram.load(pkg)


def test_corrupt_or_missing_package_is_an_artifact_error(small_pkg, work):
    pkg = _copy(small_pkg, work / "corrupt.mlpackage")
    (pkg / "Data" / "com.apple.CoreML" / "model.mlmodel").write_bytes(b"\x08\x09garbage\xff\xff\xff")
    with pytest.raises(ArtifactError):
        MILProgram.load(pkg)
    with pytest.raises(ArtifactError, match="no such"):
        MILProgram.load(work / "does_not_exist.mlpackage")
    pkg2 = _copy(small_pkg, work / "badsentinel.mlpackage")
    weights = pkg2 / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    data = bytearray(weights.read_bytes())
    data[64:68] = b"\x00\x00\x00\x00"
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sentinel"):
        MILProgram.load(pkg2)


def test_bad_inputs_are_rejected(small_pkg):
    p = MILProgram.load(small_pkg)
    assert p.inputs() == {"x": ((2, 6), np.dtype(np.float32))}
    with pytest.raises(BadInputError, match="needs input 'x'"):
        p.run({})
    with pytest.raises(BadInputError, match="shape"):
        p.run({"x": np.zeros((3, 6), np.float32)})
    with pytest.raises(BadInputError, match="no function"):
        p.run({"x": np.zeros((2, 6), np.float32)}, function="nope")


def test_load_accepts_model_file_path_and_reports_provenance(small_pkg):
    p = MILProgram.load(small_pkg / "Data" / "com.apple.CoreML" / "model.mlmodel")
    x = rand(2, 6)
    (out,) = p.run({"x": x}).values()
    assert out.shape == (2,)
    assert PROVENANCE == "Core ML program emulated on Linux (NumPy MIL interpreter)"


def test_every_model_op_is_supported():
    """The op union of the model's Core ML programs (fp32 / fp16 / int8-weight / int8-static, iOS 18)."""
    model_ops = {
        "add", "cast", "concat", "const", "constexpr_blockwise_shift_scale", "conv", "cos", "dequantize", "expand_dims",
        "fill_like", "gather", "gelu", "greater_equal", "layer_norm", "less_equal", "linear", "matmul", "mul", "pow",
        "quantize", "read_state", "reduce_mean", "reduce_sum", "reshape", "rsqrt", "select", "shape", "silu", "sin",
        "slice_by_index", "slice_update", "softmax", "split", "squeeze", "stack", "sub", "tile", "transpose",
        "write_state",
    }
    assert model_ops <= SUPPORTED_OPS
    tested = set().union(*(c.ops for c in CASES)) | {"const", "constexpr_blockwise_shift_scale", "read_state",
                                                     "write_state", "coreml_update_state"}
    assert model_ops <= tested, model_ops - tested


# --- the coremltools internals ------------------------------------------------------------------


def test_coremltools_internals_are_reached_only_through_compat():
    """targets/coreml/compat.py is the one module that touches coremltools' private paths (protos, pymil, milproto,
    ``_``-prefixed names), and it was read from the coremltools installed here."""
    import re

    root = Path(__file__).resolve().parent.parent / "targets" / "coreml"
    private = re.compile(r"coremltools\.proto|milproto|(\.|import\s+|,\s*)_[A-Za-z]\w*|converters\.mil\.mil|libcoremlpython")
    offenders = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "compat.py":
            continue
        for no, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if ("coremltools" in code and private.search(code) and not code.strip().startswith(('"', "'", "``"))
                    or "_mil_program" in code):
                offenders.append(f"{path.relative_to(root)}:{no}: {line.strip()}")
    assert not offenders, offenders
    assert ct.__version__ == compat.COREMLTOOLS_VERSION_READ, "re-read the paths in targets/coreml/compat.py for this coremltools"
