"""What onnxruntime's CPU session holds for block-quantized weights, per byte of the weight file.

    python examples/ort_session_memory.py [--dir /tmp/ortmem] [--layers 24]

Writes one standalone graph per form (LAYERS chained 4096x4096 MatMuls, random fp32 weights put through
onnxruntime's own MatMulNBitsQuantizer, accuracy_level 4, external data), then opens each in a fresh process
(the CPU EP prepacks MatMulNBits at session creation) and prints the resident memory the session added, over the
file's weight bytes and over the plain int8 (or int4) bytes, and the session's peak (VmHWM) over the plain bytes.
This is the measurement behind the README's "Exporting the 9B" remark on the ORT int8-weight session size: the
dq8_channel rows are int8-weight's default form (per-channel DequantizeLinear -> MatMul), which onnxruntime fuses
into 8-bit MatMulNBits with block 32 while the session is created; dq8_128 is the same as a standard blockwise
DequantizeLinear (opset 21, block_size 128); the nb rows are MatMulNBits written directly (int8-weight
--group-size N, int4-weight).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

K = N = 4096
FORMS = {"dq8_channel": (8, 0), "dq8_128": (8, -128), "nb8_32": (8, 32), "nb8_128": (8, 128), "nb4_32": (4, 32),
         "nb4_128": (4, 128)}  # block 0: per-channel DequantizeLinear; -N: blockwise DequantizeLinear of N


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))


def dq_int8(w: np.ndarray, i: int, block: int) -> tuple[list, list]:
    """w as int8 + fp32 scales feeding a DequantizeLinear: per output channel (block 0, as int8-weight writes it)
    or in blocks of ``block`` inputs (opset 21's block_size)."""
    from onnx import helper, numpy_helper

    if block:
        wb = w.reshape(K // block, block, N)
        s = np.abs(wb).max(1) / 127
        q = np.clip(np.round(wb / s[:, None, :]), -127, 127).astype(np.int8).reshape(K, N)
        node = helper.make_node("DequantizeLinear", [f"q{i}", f"s{i}"], [f"w{i}"], axis=0, block_size=block)
    else:
        s = np.abs(w).max(0) / 127
        q = np.clip(np.round(w / s), -127, 127).astype(np.int8)
        node = helper.make_node("DequantizeLinear", [f"q{i}", f"s{i}"], [f"w{i}"], axis=1)
    return [numpy_helper.from_array(q, f"q{i}"), numpy_helper.from_array(s.astype(np.float32), f"s{i}")], [node]


def build(path: str, bits: int, block: int, layers: int) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        w = rng.standard_normal((K, N), dtype=np.float32) * 0.02
        if block <= 0:
            tensors, dq = dq_int8(w, i, -block)
            inits += tensors
            nodes += dq
        else:
            inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"y{i}"]))
        x = f"y{i}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21 if block <= 0 else 17)])
    if block > 0:
        cfg = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, accuracy_level=4, bits=bits)
        q = MatMulNBitsQuantizer(model, algo_config=cfg)
        q.process()
        model = q.model.model
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=os.path.basename(path) + ".data")


def measure(path: str) -> dict:
    import onnxruntime as ort

    before = rss_mb()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.add_session_config_entry("session.qdqisint8allowed", "1")  # as targets/ort/session.py opens artifacts
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    s.run(None, {"x": np.ones((1, K), np.float32)})
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM"))
    return {"session_mb": rss_mb() - before, "peak_mb": hwm - before, "file_mb": os.path.getsize(path + ".data") / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/ortmem")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # child process: one session
    a = ap.parse_args()
    if a.measure:
        print(json.dumps(measure(a.measure)))
        return
    os.makedirs(a.dir, exist_ok=True)
    print("| form | bits | block | weight file MiB | session MiB | x file | x plain int bytes | peak x plain |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (bits, block) in FORMS.items():
        path = os.path.join(a.dir, f"{name}.onnx")
        if not os.path.exists(path + ".data"):
            build(path, bits, block, a.layers)
        out = subprocess.run([sys.executable, __file__, "--measure", path], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        plain = K * N * a.layers * bits / 8 / 2**20
        form = ("DequantizeLinear per channel" if block == 0 else f"DequantizeLinear block_size" if block < 0
                else "MatMulNBits")
        print(f"| {form} | {bits} | {abs(block) or 'channel'} | {r['file_mb']:.0f} | {r['session_mb']:.0f} | "
              f"{r['session_mb'] / r['file_mb']:.2f} | {r['session_mb'] / plain:.2f} | {r['peak_mb'] / plain:.2f} |")


if __name__ == "__main__":
    main()
