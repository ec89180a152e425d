"""The decoder's attention as onnxruntime's fused ``com.microsoft.GroupQueryAttention``.

Written out op by op (torch.onnx's translation of the eager attention), each layer's KV append, GQA
head repeat, causal mask, scores and softmax are ~20 kernels per layer per decoder call; onnxruntime's
session optimizer does not fuse them back (README "ONNX Runtime kernels": 1,438 kernels per SmolLM2 step,
against 309 in onnxruntime-genai's builder, which writes ``GroupQueryAttention`` itself). Here the ORT
graph's ``attend`` (exporter.model.decoder.AttendFn) is one custom torch op per layer,
``autoglm_ort::group_query_attention[_rotary]``, whose eager body is the reference math and which
torch.onnx translates into one ``GroupQueryAttention`` node: past key/value ``[1, kv, P, D]`` in, the
projected query, key and value of the new tokens ``[1, T, n * D]`` in, present key/value
``[1, kv, P + T, D]`` out (the graph's I/O is unchanged; a runner may also bind one max-length buffer as both,
which the kernel appends to in place: targets/ort/session.py, genai's past_present_share_buffer). The M-RoPE
rotation is the kernel's too where its CPU kernel can do it (``do_rotary``, from per-call tables:
:func:`gqa_attend`), else ours before the node.

The mask: ``GroupQueryAttention`` is causal over ``seqlens_k`` (keys per row - 1) and
``total_sequence_length``, both taken from ``attention_mask`` as onnxruntime-genai's graphs take them
(ReduceSum - 1, and its length). The runner and genai feed an all-ones mask of P + T; a mask with holes
(padding inside a batch of one) is not what this graph computes, as in genai's own.
"""

from __future__ import annotations

import onnxscript
import torch
from onnx.defs import OpSchema

from exporter.model.decoder import (AttendFn, Heads, Rope, grouped_attention, rotate_halves, rotate_pairs,
                                    split_heads)

MSFT = onnxscript.values.Opset("com.microsoft", 1)


def _schema(rotary: bool) -> OpSchema:
    """The part of GroupQueryAttention's signature this graph uses.

    onnxscript emits an op only from an ``onnx.defs`` schema, and onnxruntime's contrib schemas live in
    its C++ registry, not onnx's; this one is the recorder's description of the node we write (inputs up
    to ``total_sequence_length``, or up to ``position_ids`` with the rotation, the three outputs, the
    attributes we set). onnxruntime checks the node against its own schema when the session opens.
    """
    f = OpSchema.FormalParameter
    attr = OpSchema.Attribute
    inputs = [f("query", "T"), f("key", "T"), f("value", "T"), f("past_key", "T"), f("past_value", "T"),
              f("seqlens_k", "M"), f("total_sequence_length", "M")]
    attributes = [attr("num_heads", OpSchema.AttrType.INT, ""), attr("kv_num_heads", OpSchema.AttrType.INT, ""),
                  attr("scale", OpSchema.AttrType.FLOAT, "", required=False)]
    constraints = [("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], "")]
    if rotary:
        inputs += [f("cos_cache", "T"), f("sin_cache", "T"), f("position_ids", "P")]
        attributes += [attr("do_rotary", OpSchema.AttrType.INT, "", required=False),
                       attr("rotary_interleaved", OpSchema.AttrType.INT, "", required=False)]
        constraints.append(("P", ["tensor(int64)"], ""))
    return OpSchema("GroupQueryAttention", "com.microsoft", 1, inputs=inputs,
                    outputs=[f("output", "T"), f("present_key", "T"), f("present_value", "T")],
                    type_constraints=constraints, attributes=attributes)


_GQA = onnxscript.values.Op(MSFT, "GroupQueryAttention", _schema(rotary=False))
_GQA_ROTARY = onnxscript.values.Op(MSFT, "GroupQueryAttention", _schema(rotary=True))


def _attention(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
               past_value: torch.Tensor, num_heads: int, kv_num_heads: int, scale: float) -> tuple[torch.Tensor, ...]:
    """GroupQueryAttention's semantics on rotated heads (q [1, heads, T, D], key / value [1, kv, T, D]) after
    the past: the reference attention (grouped_attention), every key position up to the query's own (an
    all-ones mask); returns the output and the presents."""
    t = q.shape[2]
    k = torch.cat((past_key, key), dim=2)
    v = torch.cat((past_value, value), dim=2)
    s = k.shape[2]
    causal = torch.arange(s, device=q.device)[None] <= (torch.arange(t, device=q.device) + s - t)[:, None]
    return grouped_attention(q, k, v, causal, (num_heads, kv_num_heads, q.shape[-1]), scale), k, v


def _fake(query, past_key, past_value, num_heads, kv_num_heads):
    b, t, _ = query.shape
    d = past_key.shape[-1]
    s = past_key.shape[2] + t
    return (query.new_empty(b, t, num_heads * d), past_key.new_empty(b, kv_num_heads, s, d),
            past_value.new_empty(b, kv_num_heads, s, d))


@torch.library.custom_op("autoglm_ort::group_query_attention", mutates_args=())
def group_query_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor,
    seqlens_k: torch.Tensor, total_sequence_length: torch.Tensor, num_heads: int, kv_num_heads: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GroupQueryAttention without rotation: query / key / value ``[1, T, n * D]``, rotated already."""
    d = past_key.shape[-1]
    return _attention(split_heads(query, num_heads, d), split_heads(key, kv_num_heads, d),
                      split_heads(value, kv_num_heads, d),
                      past_key, past_value, num_heads, kv_num_heads, scale)


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, num_heads, kv_num_heads, scale):
    return _fake(query, past_key, past_value, num_heads, kv_num_heads)


@torch.library.custom_op("autoglm_ort::group_query_attention_rotary", mutates_args=())
def group_query_attention_rotary(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor,
    seqlens_k: torch.Tensor, total_sequence_length: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
    position_ids: torch.Tensor, num_heads: int, kv_num_heads: int, scale: float, rotary_interleaved: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GroupQueryAttention with its own rotation (``do_rotary``): query and key rotated by the rows
    ``position_ids`` [1, T] of ``cos_cache`` / ``sin_cache`` [rows, rotary_dim / 2] over their first
    rotary_dim channels (pairs interleaved, or halves)."""
    cos, sin = cos_cache[position_ids[0]], sin_cache[position_ids[0]]  # [T, rotary_dim / 2]
    if rotary_interleaved:
        cos, sin, turn = cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1), rotate_pairs
    else:
        cos, sin, turn = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1), rotate_halves
    dim = cos.shape[-1]
    d = past_key.shape[-1]

    def rotate(x: torch.Tensor, n: int) -> torch.Tensor:  # [1, T, n * D] -> [1, n, T, D], as Rope.apply rotates
        x = split_heads(x, n, d)
        rot, keep = x[..., :dim], x[..., dim:]
        return torch.cat((rot * cos + turn(rot) * sin, keep), dim=-1)

    return _attention(rotate(query, num_heads), rotate(key, kv_num_heads), split_heads(value, kv_num_heads, d),
                      past_key, past_value, num_heads, kv_num_heads, scale)


@group_query_attention_rotary.register_fake
def _(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache, position_ids,
      num_heads, kv_num_heads, scale, rotary_interleaved):
    return _fake(query, past_key, past_value, num_heads, kv_num_heads)


def _to_onnx(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, num_heads: int,
             kv_num_heads: int, scale: float):
    return _GQA(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, num_heads=num_heads,
                kv_num_heads=kv_num_heads, scale=scale)


def _to_onnx_rotary(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache,
                    position_ids, num_heads: int, kv_num_heads: int, scale: float, rotary_interleaved: int):
    return _GQA_ROTARY(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache,
                       position_ids, num_heads=num_heads, kv_num_heads=kv_num_heads, scale=scale, do_rotary=1,
                       rotary_interleaved=rotary_interleaved)


# torch.onnx.export(custom_translation_table=...) for every graph that may hold the ops
TRANSLATIONS = {
    torch.ops.autoglm_ort.group_query_attention.default: _to_onnx,
    torch.ops.autoglm_ort.group_query_attention_rotary.default: _to_onnx_rotary,
}


def fused_rotary(rope: Rope, head_dim: int) -> bool:
    """Whether GroupQueryAttention can rotate for this model: onnxruntime's CPU kernel takes cos / sin tables
    of rotary_dim / 2 columns, a multiple of 8 and at most head_dim / 2 (tiny's 8-wide rotation is not)."""
    half = rope.dim // 2
    return half % 8 == 0 and half <= head_dim // 2


def gqa_attend(past: list[tuple[torch.Tensor, torch.Tensor]], attention_mask: torch.Tensor,
               presents: list[tuple[torch.Tensor, torch.Tensor]]) -> AttendFn:
    """``attend`` for the ORT decoder graph: past[i] ``[1, kv, P, D]`` in, ``presents`` filled in layer order.

    With :func:`fused_rotary`, the rotation is GroupQueryAttention's too: the M-RoPE angles of this call's T
    tokens (three position axes, so not a function of one position) become a T-row cos / sin table, padded
    with zero rows to P + T (the kernel checks the table against ``total_sequence_length``), and
    ``position_ids`` [1, T] = 0..T-1 points each token at its own row. The tables are made once per call
    and shared by every layer.
    """
    seqlens_k = (attention_mask.sum(-1) - 1).to(torch.int32)  # [1]: the last key's index, per batch row
    total = attention_mask.sum().to(torch.int32)  # scalar: P + T (all-ones mask)
    tables: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def rotary_tables(rope: Rope, cos: torch.Tensor, sin: torch.Tensor, past_len: int):
        if id(cos) not in tables:  # [T, rotary_dim] as Rope gives them -> the kernel's [P + T, rotary_dim / 2]
            half = cos[:, ::2] if rope.interleaved else cos[:, : rope.dim // 2]
            half_sin = sin[:, ::2] if rope.interleaved else sin[:, : rope.dim // 2]
            pad = half.new_zeros(past_len, half.shape[1])
            positions = torch.arange(cos.shape[0], device=cos.device).unsqueeze(0)
            tables[id(cos)] = (torch.cat((half, pad)), torch.cat((half_sin, pad)), positions)
        return tables[id(cos)]

    def attend(layer: int, q, k, v, heads: Heads, rope: Rope, cos, sin) -> torch.Tensor:
        n, n_kv, head_dim = heads
        pk, pv = past[layer]
        if fused_rotary(rope, head_dim):
            cos_cache, sin_cache, positions = rotary_tables(rope, cos, sin, pk.shape[2])
            out, kk, vv = group_query_attention_rotary(q, k, v, pk, pv, seqlens_k, total, cos_cache, sin_cache,
                                                       positions, n, n_kv, head_dim**-0.5, int(rope.interleaved))
        else:
            def rotated(x: torch.Tensor, count: int) -> torch.Tensor:  # [1, T, n * D] -> rotated, same layout
                return rope.apply(split_heads(x, count, head_dim), cos, sin).transpose(1, 2).flatten(2)

            out, kk, vv = group_query_attention(rotated(q, n), rotated(k, n_kv), v, pk, pv, seqlens_k, total, n, n_kv,
                                                head_dim**-0.5)
        presents.append((kk, vv))
        return out

    return attend
