"""ExecuTorch target: one multi-method .pte lowered to XNNPACK.

The program holds the four methods (token_embedding, vision_encoder,
audio_encoder, text_decoder) plus constant metadata methods, in the layout
ExecuTorch's stock ``MultimodalRunner`` (the C++ runner apps ship) expects:
``text_decoder(embeds [1,T,H], cache_position [T]) -> logits [1,T,V]``,
``vision_encoder(pixels)``, ``audio_encoder(mel)``, each input segment
prefilled by its own call.

GLM's 3-D M-RoPE positions cannot come from that caller, so they are
``text_decoder``'s own state (mutable buffers no other method touches: the
stock runner's C++ ``Module`` gives each method its own memory, so state
shared across methods would never arrive there). The decoder recognises an
image prefill by what the stock runner does pass it: the text segment before
an image ends with ``<|begin_of_image|>`` (``image_start_id``), whose
embedding row the decoder holds as a constant; a call whose last row matches
it (relative L2 within ``MARKER_TOL``, which also admits the int8 byte-quantized
embedding) marks the next call, and a marked call of exactly ``image_tokens``
rows is the image grid. It gets positions (t, h, w) = (p, p + row, p + col);
any other call gets text positions (p + i on all three axes). The rope offset
then advances by the grid side after an image, by T after text; a call at
cache position 0 starts afresh. This is exactly the host runner's position
rule (exporter/runner.py), so our runner drives the same .pte the same way and
the ``position_ids`` it computes are not needed.
The KV cache lives in mutable buffers written in place (index_copy_).

Recipes:
  fp32         XNNPACK fp32.
  int8-weight  int8 per-channel weights (torchao Int8DynamicActivationIntxWeightConfig,
               XNNPACK qd8-f32-qc8w kernels: activations are quantized per token at run
               time). XNNPACK's weight-only int8 path in executorch 1.5.1 returns wrong
               numbers (STACK.md), so it is not offered.
  8da4w        int4 weights in groups (group_size), dynamic int8 activations.
  int8-static  PT2E with the XNNPACK quantizer: static per-tensor int8 activations
               (observers fed with real calibration samples through the reference
               runner), per-channel int8 weights.
Every int8 recipe stores the embedding table as int8 rows (ExecuTorch's
``quantized_decomposed::embedding_byte``) and honours ``Recipe.keep_float``.
A quantized program is accepted only after a parity gate against the eager
reference on a held-out sample; the lowering report fails the export when a
linear or matmul is left on the portable (non-XNNPACK) path.
"""

from __future__ import annotations

import copy
import ctypes
import gc
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from calibration.stats import resolve_method_inputs, spread
from core.errors import ArtifactError, BadInputError, ExportError, RuntimeFailure
from core.artifact import (
    Artifact,
    Progress,
    atomic_artifact_dir,
    no_progress,
    peak_rss_mb,
    read_artifact,
    runtime_versions,
    write_artifact_json,
)
from core.recipes import Recipe
from targets.base import artifact_metadata, check_recipe, export_gate, copy_tokenizer_files, method_signatures

RECIPES = ("fp32", "int8-weight", "8da4w", "int8-static")
PTE = "model.pte"
STATE = "mrope"  # text_decoder's position-state module (buffers mrope.offset, mrope.image_next)
# relative L2 distance within which a row is <|begin_of_image|>: int8 byte rows of it lie ~0.006 away on tiny,
# other tokens' rows > 1; the export checks both sides (report["image_marker"])
MARKER_TOL = 0.1
# ops that must never run outside XNNPACK (substring match on the edge op name)
MUST_DELEGATE = ("linear", ".mm.", "bmm", "addmm", "matmul", "convolution")
# export check (targets.base.export_gate): cosine floor and relative-L2 ceiling per recipe, on a held-out sample
GATE = {
    "fp32": (0.99999, 1e-3),
    "int8-weight": (0.99, 0.15),
    "8da4w": (0.95, 0.35),
    "int8-static": (0.95, 0.35),
}
# int8-static: the ops PT2E quantizes (one overload per pattern family; each annotator takes the whole family)
PT2E_OPS = (torch.ops.aten.linear.default, torch.ops.aten.conv2d.default)
MAX_CALIB = {"token_embedding": 64, "vision_encoder": 24, "audio_encoder": 24}
CALIB_PROMPTS = 16  # whole prompts replayed through the decoder (its cache is internal state)


# --- the program's modules ------------------------------------------------------------


class RopeState(nn.Module):
    """text_decoder's M-RoPE state: the rope offset, and whether the last call ended with <|begin_of_image|>."""

    def __init__(self):
        super().__init__()
        self.register_buffer("offset", torch.zeros(1, dtype=torch.long), persistent=False)
        self.register_buffer("image_next", torch.zeros(1, dtype=torch.long), persistent=False)


class EtTextDecoder(nn.Module):
    """text_decoder(embeds, cache_position): positions from its own state (the runner's rule).

    ``image_start`` is the <|begin_of_image|> embedding row [H] (None: the model has no vision, every
    call is text); an image is ``grid`` x ``grid`` rows. Position arithmetic uses int64 constant tensors,
    never Python scalars: PT2E turns scalar operands into float32 constants, which made the int8-static
    program compute positions in float (through XNNPACK) and cast them back into the int64 state.
    """

    def __init__(self, inner: nn.Module, grid: int, max_seq_len: int, image_start: torch.Tensor | None = None):
        super().__init__()
        self.inner = inner
        self.vision = image_start is not None
        g = max(grid, 1)
        steps = torch.arange(max_seq_len, dtype=torch.long)
        self.register_buffer("steps", steps, persistent=False)
        self.register_buffer("one", torch.ones(1, dtype=torch.long), persistent=False)
        if image_start is not None:
            row = image_start.detach().float().reshape(-1)
            self.register_buffer("image_start", row.clone(), persistent=False)
            # squared distance below which a row is <|begin_of_image|>: (MARKER_TOL * |row|)^2
            self.threshold = float((MARKER_TOL * row.norm()) ** 2)
            self.register_buffer("rows", torch.div(steps, g, rounding_mode="floor"), persistent=False)
            self.register_buffer("cols", steps % g, persistent=False)
            self.register_buffer("side", torch.full((1,), g, dtype=torch.long), persistent=False)
            self.register_buffer("image_len", torch.full((1,), g * g, dtype=torch.long), persistent=False)
        setattr(self, STATE, RopeState())

    def forward(self, embeds: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        state: RopeState = getattr(self, STATE)
        t = embeds.shape[1]
        idx = self.steps[:t]
        fresh = cache_position[:1] == 0
        offset = torch.where(fresh, torch.zeros_like(state.offset), state.offset)
        text = offset + idx
        after_text = text[-1:] + self.one
        if not self.vision:
            state.offset.copy_(after_text)
            return self.inner(embeds, text.unsqueeze(0).expand(3, t), cache_position)
        marked = (state.image_next > 0) & ~fresh
        image = marked & (idx[-1:] + self.one == self.image_len)  # a marked call of exactly one image's rows
        grid = torch.stack([offset.expand(t), offset + self.rows[:t], offset + self.cols[:t]])
        position_ids = torch.where(image, grid, text.unsqueeze(0).expand(3, t))
        state.offset.copy_(torch.where(image, offset + self.side, after_text))
        diff = embeds[0, -1:].float() - self.image_start  # [1, H]: this call's last row
        state.image_next.copy_(((diff * diff).sum(dim=-1) <= self.threshold).long())
        return self.inner(embeds, position_ids, cache_position)


class ByteEmbedding(nn.Module):
    """An embedding table stored as int8 rows + one fp32 scale per row (ExecuTorch embedding_byte)."""

    def __init__(self, emb: nn.Embedding):
        super().__init__()
        import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401 (registers the op)

        w = emb.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        self.register_buffer("weight", torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8))
        self.register_buffer("scales", scale)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized_decomposed.embedding_byte.dtype(
            self.weight, self.scales, None, -128, 127, tokens, dtype=torch.float32
        )


def image_start_row(components: Any) -> torch.Tensor | None:
    """The <|begin_of_image|> row token_embedding returns (the eager reference's), or None without vision."""
    cfg = components.config
    if cfg.vision is None:
        return None
    if cfg.tokens.image_start_id < 0:
        raise ExportError(
            f"model '{cfg.name}' has vision but no image_start_id: the ExecuTorch text_decoder recognises an "
            "image prefill by the <|begin_of_image|> row that ends the text before it"
        )
    with torch.no_grad():
        return components.token_embedding(torch.tensor([[cfg.tokens.image_start_id]]))[0, 0].float()


def nearest_other_row(components: Any, row: torch.Tensor, chunk: int = 4096) -> tuple[int, float]:
    """The token whose embedding is nearest ``row`` (other than image_start_id), and its relative L2 distance.

    The marker is only sound when no other token comes within MARKER_TOL of it.
    """
    cfg = components.config
    best, best_id = float("inf"), -1
    with torch.no_grad():
        for lo in range(0, cfg.text.vocab_size, chunk):
            ids = torch.arange(lo, min(lo + chunk, cfg.text.vocab_size))
            d = (components.token_embedding(ids[None])[0].float() - row).norm(dim=-1) / row.norm()
            d[ids == cfg.tokens.image_start_id] = float("inf")
            i = int(d.argmin())
            if float(d[i]) < best:
                best, best_id = float(d[i]), int(ids[i])
    return best_id, best


def program_modules(components: Any, image_start: torch.Tensor | None = None) -> dict[str, nn.Module]:
    """The modules each .pte method is exported from (stock-runner signatures)."""
    grid = components.config.image_grid // components.config.vision.spatial_merge_size if components.config.vision else 1
    out: dict[str, nn.Module] = {}
    for name, module in components.methods().items():
        if name == "text_decoder":
            max_len = getattr(module, "max_seq_len", components.config.shape.max_seq_len)
            out[name] = EtTextDecoder(module, grid, max_len, image_start)
        else:
            out[name] = module
    return out


def example_inputs(components: Any, method: str) -> tuple[torch.Tensor, ...]:
    ex = components.example_inputs(method, seq_len=4)
    if method == "text_decoder":
        return (ex[0], ex[2])
    return ex


def dynamic_shapes(components: Any, method: str):
    ds = components.dynamic_shapes(method)
    if method == "text_decoder":
        return {"embeds": ds["embeds"], "cache_position": ds["cache_position"]}
    return ds


_COMPONENT_NAMES = {"token_embedding": ("tokens",), "vision_encoder": ("pixels",), "audio_encoder": ("mel",)}


def input_names(method: str) -> tuple[str, ...]:
    """The .pte method's inputs (the stock runner's: the decoder takes no position_ids)."""
    return ("embeds", "cache_position") if method == "text_decoder" else _COMPONENT_NAMES[method]


def constant_methods(config: Any, recipe: Recipe) -> dict[str, Any]:
    """Metadata the stock LLM runner reads, plus ours (strings and int lists are allowed)."""
    meta = artifact_metadata(config, recipe)
    t = config.tokens
    out: dict[str, Any] = {
        "get_max_seq_len": config.shape.max_seq_len,
        "get_max_context_len": config.shape.max_seq_len,
        "get_vocab_size": config.text.vocab_size,
        "get_bos_id": t.bos_ids[0] if t.bos_ids else -1,
        "get_eos_ids": list(t.eos_ids),
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": False,
        "enable_dynamic_shape": True,
    }
    for key in ("image_size", "image_tokens", "audio_frames", "audio_tokens", "n_mels", "image_token_id",
                "image_start_id", "image_end_id", "audio_token_id", "audio_start_id", "audio_end_id"):
        out[f"get_{key}"] = int(meta[key])
    out["get_recipe"] = recipe.name
    out["get_package_version"] = meta["package_version"]
    out["get_model_name"] = config.name
    return out


# --- the saved program's I/O ----------------------------------------------------------

# c10::ScalarType codes (what MethodMeta's TensorInfo.dtype() returns) -> numpy-style names
SCALAR_TYPES = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 5: "float16", 6: "float32",
                7: "float64", 11: "bool", 15: "bfloat16"}


def user_input_names(ep: Any) -> list[str]:
    """The exported program's user inputs, by name (the .pte keeps positions only)."""
    from torch.export.graph_signature import InputKind

    return [spec.arg.name for spec in ep.graph_signature.input_specs if spec.kind == InputKind.USER_INPUT]


def read_program_io(pte: Path, names: dict[str, tuple[list[str], list[str]]]) -> dict[str, Any]:
    """Each method's inputs and outputs as the ExecuTorch runtime reads them from the saved .pte.

    dtype and sizes come from the program's method metadata; a dynamic dimension reads as the upper
    bound the program was planned for (e.g. max_seq_len for T), which is what the runtime enforces.
    ``names`` gives (input names, output names) per method: the exported program's input names, the
    runner interface's output names (the .pte stores neither).
    """
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(pte)
    out: dict[str, Any] = {}
    for m, (ins, outs) in names.items():
        meta = program.metadata(m)
        if meta.num_inputs() != len(ins) or meta.num_outputs() != len(outs):
            raise ExportError(
                f"{pte.name} method {m} takes {meta.num_inputs()} inputs and returns {meta.num_outputs()} outputs; "
                f"the export expected {ins} -> {outs}"
            )

        def tensors(get, labels):
            return [{"name": n, "dtype": SCALAR_TYPES.get(int(t.dtype()), str(t.dtype())), "shape": [int(d) for d in t.sizes()]}
                    for n, t in zip(labels, (get(i) for i in range(len(labels))))]

        out[m] = {"file": pte.name, "inputs": tensors(meta.input_tensor_meta, ins),
                  "outputs": tensors(meta.output_tensor_meta, outs)}
    return out


# --- quantization ---------------------------------------------------------------------


def _keep_names(module: nn.Module, model: nn.Module, keep_float: tuple[str, ...]) -> set[str]:
    """Names (inside ``module``) of the model modules listed in keep_float (model.named_modules() names)."""
    if not keep_float:
        return set()
    wanted = {id(m) for n, m in model.named_modules() if n in keep_float or any(n.startswith(k + ".") for k in keep_float)}
    return {n for n, m in module.named_modules() if id(m) in wanted}


def _quantize_embedding(module: nn.Module, keep: set[str]) -> int:
    """Swap every nn.Embedding not kept in float for a ByteEmbedding; returns how many were swapped."""
    n = 0
    for name, child in list(module.named_modules()):
        for attr, sub in list(child.named_children()):
            full = f"{name}.{attr}" if name else attr
            if isinstance(sub, nn.Embedding) and full not in keep:
                setattr(child, attr, ByteEmbedding(sub))
                n += 1
    return n


def _torchao_config(recipe: Recipe):
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig

    if recipe.name == "int8-weight":
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    if recipe.group_size <= 0:
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerAxis(0))
    return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(recipe.group_size))


def _quantize_linears(module: nn.Module, recipe: Recipe, keep: set[str]) -> dict[str, Any]:
    from torchao.quantization.quant_api import quantize_

    picked, skipped = [], []

    def want(mod: nn.Module, fqn: str) -> bool:
        if not isinstance(mod, nn.Linear):
            return False
        if fqn in keep:
            skipped.append(fqn)
            return False
        if recipe.name == "8da4w" and recipe.group_size > 0 and mod.in_features % recipe.group_size:
            skipped.append(f"{fqn} (in_features {mod.in_features} not a multiple of group {recipe.group_size})")
            return False
        picked.append(fqn)
        return True

    quantize_(module, _torchao_config(recipe), filter_fn=want)
    return {"quantized_linears": len(picked), "kept_float": skipped}


def xnnpack_static_quantizer(keep: Iterable[str] = ()):
    """The PT2E quantizer of the int8-static recipe: per-channel int8 weights, static int8 activations.

    W8A8 on the weight-bearing ops only (linear, conv): the quantizer's global config would also put
    per-tensor int8 on every add / mul / cat, i.e. the residual stream, the RMSNorm scaling, the rope
    products and the KV cache concat, which costs far more accuracy than it saves time (tiny decoder
    cosine 0.9775 -> 0.9995). Nodes inside a module named in ``keep`` stay float.
    """
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_module_name_filter,
        get_symmetric_quantization_config,
    )

    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)
    quantizer = XNNPACKQuantizer()
    for op in PT2E_OPS:
        quantizer.set_operator_type(op, config)
    kept = [get_module_name_filter(name) for name in sorted(keep)]
    if kept:  # (set_module_name(name, None) is not supported by this quantizer)
        quantizer.set_filter_function(lambda n: not any(f(n) for f in kept))
    return quantizer


def _pt2e_quantize(
    components: Any,
    method: str,
    module: nn.Module,
    samples: list[tuple],
    keep: set[str],
    before_call: Callable[[nn.Module, int], None] | None = None,
):
    """PT2E static int8 (XNNPACK quantizer, per-channel weights); returns the re-exported program."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = xnnpack_static_quantizer(keep)
    with torch.no_grad():
        ep = torch.export.export(
            module, example_inputs(components, method), dynamic_shapes=dynamic_shapes(components, method), strict=False
        )
        prepared = prepare_pt2e(ep.module(), quantizer)
        for i, args in enumerate(samples):
            if before_call is not None:
                before_call(prepared, i)
            prepared(*args)
        converted = convert_pt2e(prepared)
        return torch.export.export(
            converted, example_inputs(components, method), dynamic_shapes=dynamic_shapes(components, method), strict=False
        )


def _decoder_prompts(samples: list[dict]) -> list[list[dict]]:
    """Recorded decoder calls split into prompts (a call at cache position 0 starts one)."""
    prompts: list[list[dict]] = []
    for s in samples:
        if int(np.asarray(s["cache_position"]).reshape(-1)[0]) == 0 or not prompts:
            prompts.append([])
        prompts[-1].append(s)
    return prompts


def _is_image_call(sample: dict) -> bool:
    pos = np.asarray(sample["position_ids"])
    return bool(pos.shape[-1] > 1 and np.any(pos[1] != pos[0]))


# --- lowering -------------------------------------------------------------------------


def lowering_report(edge: Any, methods: list[str]) -> dict[str, Any]:
    """Per method: nodes delegated to XNNPACK vs left on the portable path, by op."""
    report: dict[str, Any] = {}
    for m in methods:
        graph = edge.exported_program(m).graph
        left: Counter[str] = Counter()
        delegates = 0
        for node in graph.nodes:
            if node.op != "call_function":
                continue
            name = str(getattr(node.target, "__name__", node.target))
            if "executorch_call_delegate" in name:
                delegates += 1
            elif name != "getitem":
                left[name.split(":")[0]] += 1
        report[m] = {"xnnpack_subgraphs": delegates, "not_delegated": dict(sorted(left.items()))}
    return report


def check_lowering(report: dict[str, Any]) -> None:
    for m, r in report.items():
        bad = [op for op in r["not_delegated"] if any(k in f".{op}." for k in MUST_DELEGATE)]
        if bad:
            raise ExportError(
                f"{m}: {', '.join(op + ' x' + str(r['not_delegated'][op]) for op in bad)} not delegated to XNNPACK "
                "(would run on the slow portable kernels)"
            )


def lower(programs: dict[str, Any], constants: dict[str, Any]):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    return to_edge_transform_and_lower(
        programs,
        partitioner=[XnnpackPartitioner()],
        compile_config=EdgeCompileConfig(_check_ir_validity=False),
        constant_methods=constants,
    )


def to_executorch(edge: Any):
    """Emit the program. The decoder's state (KV cache, rope offset, image flag) starts as its initial
    values (InitializedMutableBufferPass) and lives in memory id 2 (share_mutable_buffers), apart from
    the activation arena that the Python runtime shares between methods."""
    from executorch.exir import ExecutorchBackendConfig
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass

    return edge.to_executorch(
        ExecutorchBackendConfig(
            passes=[InitializedMutableBufferPass([STATE])],
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False, share_mutable_buffers=True),
            emit_mutable_buffer_names=True,
        )
    )


# --- the runtime ----------------------------------------------------------------------

_KERNELS_LOADED = False


def load_quantized_kernels() -> None:
    """Register ExecuTorch's quantized kernels (embedding_byte) with the Python runtime, once.

    The pybindings link the portable/optimized kernels only; an app links
    ``quantized_ops_lib`` the same way for int8 embeddings.
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
    _KERNELS_LOADED = True


class ExecuTorchSession:
    """The .pte in ExecuTorch's Python runtime (XNNPACK + portable kernels), behind the Session interface."""

    def __init__(self, path: Path, recipe: str = ""):
        from executorch import version as et_version
        from executorch.runtime import Runtime

        load_quantized_kernels()
        self.path = path
        try:
            self.program = Runtime.get().load_program(path)
            self.methods = {
                m: self.program.load_method(m)
                for m in ("token_embedding", "vision_encoder", "audio_encoder", "text_decoder")
                if m in self.program.method_names
            }
        except Exception as e:
            raise RuntimeFailure(f"ExecuTorch runtime cannot load {path}: {str(e).splitlines()[0]}") from e
        self.provenance = f"ExecuTorch {et_version.__version__} runtime, XNNPACK ({recipe})"

    def constant(self, name: str) -> Any:
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


# --- the target -----------------------------------------------------------------------


class ExecuTorchTarget:
    name = "executorch"
    recipes = RECIPES

    def export(
        self,
        components: Any,
        recipe: Recipe,
        out: Path,
        calibration: Any | None = None,
        progress: Progress = no_progress,
    ) -> Artifact:
        check_recipe(self.name, recipe, self.recipes)
        out = Path(out)
        t0 = time.perf_counter()
        config = components.config
        report: dict[str, Any] = {"quantization": {}}
        marker = image_start_row(components)
        if marker is not None:
            report["image_marker"] = self._check_marker_unique(components, marker)
        modules = program_modules(components, marker)
        methods = list(modules)
        steps = len(methods) + 3
        progress("executorch export", 0, steps)

        recorded = resolve_method_inputs(calibration, components, progress) if recipe.name == "int8-static" else None

        timings: dict[str, float] = {}
        report["timings_s"] = timings
        with atomic_artifact_dir(out) as root:
            t = time.perf_counter()
            programs: dict[str, Any] = {}
            names: dict[str, list[str]] = {}
            for i, m in enumerate(methods):
                try:
                    programs[m] = self._export_method(components, m, modules[m], recipe, recorded, report)
                    names[m] = user_input_names(programs[m])
                except (ExportError, BadInputError):
                    raise
                except Exception as e:
                    raise ExportError(f"torch.export of {m} for ExecuTorch ({recipe.name}) failed: {str(e).splitlines()[0]}") from e
                gc.collect()
                progress("executorch export", i + 1, steps)
            timings["quantize_and_export"] = round(time.perf_counter() - t, 2)
            t = time.perf_counter()
            try:
                edge = lower(programs, constant_methods(config, recipe))
            except Exception as e:
                raise ExportError(f"XNNPACK lowering ({recipe.name}) failed: {str(e).splitlines()[0]}") from e
            del programs
            gc.collect()
            report["lowering"] = lowering_report(edge, methods)
            check_lowering(report["lowering"])
            progress("executorch export", len(methods) + 1, steps)
            timings["lower_xnnpack"] = round(time.perf_counter() - t, 2)
            t = time.perf_counter()
            try:
                program = to_executorch(edge)
            except Exception as e:
                raise ExportError(f"ExecuTorch program emission ({recipe.name}) failed: {str(e).splitlines()[0]}") from e
            del edge
            gc.collect()
            pte = root / PTE
            with open(pte, "wb") as f:
                program.write_to_file(f)
            del program
            gc.collect()
            progress("executorch export", len(methods) + 2, steps)
            timings["emit"] = round(time.perf_counter() - t, 2)
            t = time.perf_counter()
            session = ExecuTorchSession(pte, recipe.name)
            if marker is not None:
                report["image_marker"].update(self._check_marker_in_program(session, components, marker))
            report["export_check"] = export_gate(self.name, recipe, session, components, GATE)
            timings["export_check"] = round(time.perf_counter() - t, 2)
            outputs = {m: list(sig["outputs"]) for m, sig in method_signatures(components).items()}
            program_io = read_program_io(pte, {m: (names[m], outputs[m]) for m in methods})
            files = [PTE, *copy_tokenizer_files(config, root)]
            if len(files) == 1:
                report["tokenizer"] = f"none: model '{config.name}' names no tokenizer.json"
            report["pte_bytes"] = pte.stat().st_size
            report["kernels"] = (
                "XNNPACK delegate + portable kernels; int8 embeddings need ExecuTorch's quantized_ops_lib "
                "(quantized_decomposed::embedding_byte) linked into the app"
                if recipe.is_quantized else "XNNPACK delegate + portable kernels"
            )
            info = {
                "target": self.name,
                "recipe": recipe.name,
                "files": files,
                "runner_interface": method_signatures(components),
                "programs": program_io,
                "metadata": {**artifact_metadata(config, recipe), "group_size": recipe.group_size if recipe.name == "8da4w" else None},
                "runtime_versions": runtime_versions("executorch", "torchao"),
                "export": {"wall_s": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(peak_rss_mb(), 1)},
                "report": report,
            }
            write_artifact_json(root, info)
            progress("executorch export", steps, steps)
        return read_artifact(out)

    def _export_method(self, components, m, module, recipe, recorded, report):
        keep = _keep_names(module, components.model, recipe.keep_float)
        if recipe.name == "fp32":
            with torch.no_grad():
                return torch.export.export(
                    module, example_inputs(components, m), dynamic_shapes=dynamic_shapes(components, m), strict=False
                )
        module = copy.deepcopy(module)  # quantization rewrites modules; the reference stays float
        q: dict[str, Any] = {"embeddings_int8": _quantize_embedding(module, keep)}
        if recipe.name in ("int8-weight", "8da4w"):
            q.update(_quantize_linears(module, recipe, keep))
            with torch.no_grad():
                ep = torch.export.export(
                    module, example_inputs(components, m), dynamic_shapes=dynamic_shapes(components, m), strict=False
                )
        else:
            samples, before = self._calibration_calls(m, recorded)
            q["calibration_calls"] = len(samples)
            q["kept_float"] = sorted(keep)
            ep = _pt2e_quantize(components, m, module, samples, keep, before)
        report["quantization"][m] = q
        return ep

    @staticmethod
    def _calibration_calls(method: str, recorded: dict[str, list[dict]]):
        samples = list(recorded.get(method, []))
        if not samples:
            raise BadInputError(f"int8-static: the calibration data has no samples for method '{method}'")
        if method != "text_decoder":
            names = _COMPONENT_NAMES[method]
            picked = spread(samples, MAX_CALIB[method])
            return [tuple(torch.from_numpy(np.ascontiguousarray(s[n])) for n in names) for s in picked], None
        calls = [c for p in spread(_decoder_prompts(samples), CALIB_PROMPTS) for c in p]
        image = [_is_image_call(c) for c in calls]

        def before(prepared: nn.Module, i: int) -> None:
            # the observers must see each prefill with the positions the program will give it
            marked = int(prepared.get_buffer(f"{STATE}.image_next")[0]) > 0
            if image[i] and not marked:
                raise ExportError(
                    f"int8-static calibration: recorded decoder call {i} is an image prefill that does not follow "
                    "<|begin_of_image|>; the program would give it text positions"
                )

        args = [
            (torch.from_numpy(np.ascontiguousarray(c["embeds"], np.float32)),
             torch.from_numpy(np.ascontiguousarray(c["cache_position"], np.int64)))
            for c in calls
        ]
        return args, before

    @staticmethod
    def _check_marker_unique(components: Any, marker: torch.Tensor) -> dict[str, Any]:
        """No other token's embedding may pass for <|begin_of_image|> (with a 2x margin)."""
        cfg = components.config
        other, dist = nearest_other_row(components, marker)
        if dist < 2 * MARKER_TOL:
            raise ExportError(
                f"model '{cfg.name}': token {other}'s embedding lies {dist:.3g} (relative L2) from "
                f"<|begin_of_image|> ({cfg.tokens.image_start_id}); the ExecuTorch text_decoder could not tell "
                f"them apart (it needs > {2 * MARKER_TOL})"
            )
        return {"token_id": cfg.tokens.image_start_id, "tolerance": MARKER_TOL, "nearest_other_token": other,
                "nearest_other_relative_l2": round(dist, 4)}

    @staticmethod
    def _check_marker_in_program(session: "ExecuTorchSession", components: Any, marker: torch.Tensor) -> dict[str, Any]:
        """The saved program's own token_embedding row for <|begin_of_image|> must match the decoder's marker
        (with a 2x margin): it is what the stock runner hands text_decoder."""
        tid = components.config.tokens.image_start_id
        row = torch.from_numpy(session.run("token_embedding", tokens=np.array([[tid]], np.int64)).reshape(-1))
        dist = float((row - marker).norm() / marker.norm())
        if not dist <= MARKER_TOL / 2:
            raise ExportError(
                f"the program's token_embedding row for <|begin_of_image|> ({tid}) lies {dist:.3g} (relative L2) from "
                f"the reference row; the text_decoder would not recognise an image prefill (needs <= {MARKER_TOL / 2})"
            )
        return {"program_row_relative_l2": round(dist, 5)}

    def load(self, artifact: Artifact) -> ExecuTorchSession:
        pte = artifact.dir / PTE
        if not pte.is_file():
            raise ArtifactError(f"{artifact.dir}: no {PTE} in this ExecuTorch artifact")
        return ExecuTorchSession(pte, artifact.recipe)

