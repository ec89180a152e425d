"""The saved .pte in ExecuTorch's Python runtime (XNNPACK + portable kernels), behind core's Session."""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.errors import BadInputError, RuntimeFailure
from targets.base import native_stderr_without
from targets.executorch.llm_decoder import register_custom_ops
from targets.executorch.program import input_names

METHODS = ("token_embedding", "vision_encoder", "audio_encoder", "text_decoder")

_KERNELS_LOADED = False


def load_runtime_kernels() -> None:
    """Register with this process's ExecuTorch runtime the kernels our programs use beyond the pybindings' own
    portable / optimized ones, once: the quantized kernels (embedding_byte of the int8 recipes) and the LLM
    custom ops (llama::update_cache, llama::custom_sdpa of every text_decoder).

    An app links ExecuTorch's ``quantized_ops_lib`` and ``custom_ops`` libraries the same way.
    """
    global _KERNELS_LOADED
    if _KERNELS_LOADED:
        return
    import executorch

    lib = Path(executorch.__path__[0]) / "lib" / "libexecutorch_kernels_quantized.so"
    if not lib.is_file():
        raise RuntimeFailure(f"ExecuTorch quantized kernels not found at {lib}")
    import executorch.runtime  # noqa: F401 (libexecutorch.so first, so the kernels register into it)

    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    try:  # libcustom_ops_aot_lib.so: its kernels register into libexecutorch.so as it loads
        register_custom_ops()
    except Exception as e:
        raise RuntimeFailure(f"ExecuTorch's LLM custom ops (llama::custom_sdpa) did not load: {e}") from e
    _KERNELS_LOADED = True


load_quantized_kernels = load_runtime_kernels  # the earlier name (README, app notes)


# what the runtime logs natively (ET_LOG, fd 2) on loading a program, once per process: the XNNPACK threadpool's
# cpuinfo probe of ARM-only files ("Failed to open midr file ...") on any other CPU
RUNTIME_NOISE = ("[cpuinfo_utils.cpp:",)


class ExecuTorchSession:
    """The .pte in ExecuTorch's Python runtime (XNNPACK + portable kernels), behind the Session interface.

    The decoder takes no position_ids (the program keeps its own M-RoPE state): ``run`` passes each
    method only the inputs the .pte declares (program.input_names).
    """

    def __init__(self, path: Path, recipe: str = ""):
        from executorch import version as et_version
        from executorch.runtime import Runtime

        load_runtime_kernels()
        self.path = path
        try:
            with native_stderr_without(RUNTIME_NOISE):
                self.program = Runtime.get().load_program(path)
                self.methods = {m: self.program.load_method(m) for m in METHODS if m in self.program.method_names}
        except Exception as e:
            raise RuntimeFailure(f"ExecuTorch runtime cannot load {path}: {str(e).splitlines()[0]}") from e
        self.provenance = f"ExecuTorch {et_version.__version__} runtime, XNNPACK ({recipe})"

    def constant(self, name: str) -> Any:
        """The value of constant method ``name`` (get_max_seq_len, get_eos_ids, ...)."""
        out = self.program.load_method(name).execute(())
        return out[0] if len(out) == 1 else list(out)

    def run(self, method: str, **inputs: np.ndarray) -> np.ndarray:
        if method not in self.methods:
            raise BadInputError(f"{self.path}: no method '{method}' (it has: {', '.join(self.methods)})")
        args = [torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in input_names(method)]
        try:
            out = self.methods[method].execute(args)
        except Exception as e:
            raise RuntimeFailure(f"ExecuTorch {method} failed on inputs {[list(a.shape) for a in args]}: {e}") from e
        return out[0].float().numpy().copy()

    def reset(self) -> None:
        # The KV cache needs no clearing (slots past the current position are masked) and a
        # call at cache position 0 restarts the rope offset inside the program.
        pass
