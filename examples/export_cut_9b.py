"""Export the AutoGLM-Phone-9B widths cut to 1 decoder layer and 1 vision block (random weights), one target x recipe.

    python examples/export_cut_9b.py coreml fp16 out/9b-1l-coreml-fp16

Prints the artifact's size, export wall time, peak RSS and the export-time per-method check against eager.
Memory: Core ML fp16 peaked at 19.9 GB on a 23 GiB machine; ExecuTorch fp32 was OOM-killed at 19.3 GB.
"""
import json, sys, time, resource
from pathlib import Path
from exporter.model import build, get_preset
from core.components import build_components
from targets import get_target
from targets.lifecycle import export
from core.recipes import Recipe
target, recipe, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
t = time.time()
comps = build_components(build(get_preset("autoglm-phone-9b").with_layers(1, vision_layers=1)))
print("built", round(time.time() - t, 1), "s", flush=True)
calib = None
if recipe == "int8-static":
    from calibration.stats import record_builtin_inputs
    calib = record_builtin_inputs(comps, limit=4)
art = export(get_target(target), comps, Recipe(recipe), out, calibration=calib)
rep = art.info["report"]
size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and not p.name.startswith("tokenizer"))
check = rep.get("export_check") or {}
print(json.dumps({"target": target, "recipe": recipe, "bytes": size, "export": art.info["export"],
                  "methods": check.get("methods"), "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, indent=1))
