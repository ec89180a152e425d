"""What an ExecuTorch build leaves resident: runs `autoglm-export export --target executorch` on a checkpoint and,
right after the build (where artifact.json's export.memory_mib "built" is read), prints the process's memory and
the live CPU tensors by dtype (gc over every object, storages counted once).

    python examples/et_build_memory.py CHECKPOINT OUT [--recipe int8-weight] [--keep-lowering-cache]

--keep-lowering-cache leaves ExecuTorch's is_same_node lru_cache filled (targets/executorch/lower.py empties it
after each lowering): the build as it was before that fix, to measure what the fix frees.
"""

from __future__ import annotations

import argparse
import collections
import gc
import sys


def live_tensors() -> dict[str, float]:
    import torch

    sizes: collections.Counter[str] = collections.Counter()
    seen: set[int] = set()
    for o in gc.get_objects():
        if not isinstance(o, torch.Tensor):
            continue
        try:
            st = o.untyped_storage()
            if st.device.type != "cpu" or st.data_ptr() in seen:
                continue
        except Exception:  # a fake or meta tensor
            continue
        seen.add(st.data_ptr())
        sizes[str(o.dtype)] += st.nbytes()
    return {k: round(v / 2**20, 1) for k, v in sizes.most_common()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("out")
    ap.add_argument("--recipe", default="int8-weight")
    ap.add_argument("--keep-lowering-cache", action="store_true")
    a = ap.parse_args()

    import targets.lifecycle as lifecycle
    from core.artifact import memory_mib

    if a.keep_lowering_cache:
        from executorch.exir.backend.utils import is_same_node

        is_same_node.cache_clear = lambda: None  # (the bound lru_cache wrapper's attribute, this process only)
    trim = lifecycle.trim_heap

    def after_build() -> None:  # lifecycle calls trim_heap once, right after target.build
        trim()
        print("after the build:", memory_mib(), flush=True)
        print("live CPU tensors (MiB; bfloat16 = the mapped checkpoint):", live_tensors(), flush=True)
        lifecycle.trim_heap = trim

    lifecycle.trim_heap = after_build
    sys.argv = ["autoglm-export", "export", "--checkpoint", a.checkpoint, "--target", "executorch",
                "--recipe", a.recipe, "--out", a.out]
    from cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
