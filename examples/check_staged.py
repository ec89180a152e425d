"""The export check, then prefill/decode speed, on program files an export built but never committed.

    python examples/check_staged.py STAGING_DIR CHECKPOINT RECIPE [TARGET [CHECK_FLOOR]]   # TARGET: ort (default), coreml

For a 9B export that the OOM killer stopped during its check (issue 16: ORT int8-weight while onnxruntime
opened the program; Core ML int4-weight while the interpreter held decoded weights): its staging directory
(``.<out>.partial-*``) held every built file. This runs the lifecycle's own check (``held_out_reference``, then
the target's ``open``, then ``export_gate`` with the recipe's gate, or ``Gate(CHECK_FLOOR)`` as ``export
--check-floor`` makes it) in a fresh process and prints each method's cosine, then times a prefill and 8
decode steps (Core ML: the NumPy interpreter's time, not a device's). Nothing is written: the staging
directory is not an artifact, and this is a measurement, not a way to commit one.
"""
import sys, time
from pathlib import Path
import numpy as np
from core.artifact import Artifact, peak_rss_mb
from core.errors import ExportError
from core.recipes import Recipe
from core.components import build_components
from core.runner import Prompt, Runner
from exporter.reference import load_reference
from targets import get_target
from targets.base import artifact_metadata, check_tokenizer, export_gate, held_out_reference, method_signatures
from targets.ort.streaming import release_pages_after_use
from targets.spec import Gate

root, ckpt, recipe = Path(sys.argv[1]), sys.argv[2], Recipe(sys.argv[3])
target_name = sys.argv[4] if len(sys.argv) > 4 else "ort"
floor = float(sys.argv[5]) if len(sys.argv) > 5 else None
t0 = time.time()
model = load_reference(checkpoint=ckpt)
release_pages_after_use(model)
comps = build_components(model)
ref = held_out_reference(comps)
print(f"eager held-out reference: {time.time() - t0:.0f} s, peak RSS so far {peak_rss_mb() / 1024:.2f} GiB", flush=True)
target = get_target(target_name)
meta = artifact_metadata(comps.config, recipe)
if target_name == "coreml":  # the decoder's chunk packages, in order (the build's metadata.decoder_chunks)
    from targets.coreml.target import decoder_chunks
    from targets.coreml.spec import decoder_package_names

    chunks = decoder_chunks(comps)
    meta["decoder_chunks"] = [{"package": f, "layers": list(c)} for f, c in zip(decoder_package_names(chunks), chunks)]
draft = Artifact(dir=root, target=target_name, recipe=recipe.name, files=sorted(p.name for p in root.iterdir()),
                 info={"target": target_name, "recipe": recipe.name, "metadata": meta,
                       "runner_interface": method_signatures(comps)})
t = time.time()
session = target.open(draft, "onnx") if target_name == "ort" else target.open(draft)
print(f"{target_name} session opened: {time.time() - t:.0f} s, peak RSS so far {peak_rss_mb() / 1024:.2f} GiB", flush=True)
t = time.time()
gate = target.spec.recipe(recipe.name).gate if floor is None else Gate(floor, None)
try:
    check = export_gate(target_name, recipe, session, ref, gate)
    print("export check PASSED")
    methods = check["methods"]
except ExportError as e:
    print("export check REFUSED:", e)
    methods = {}
for m, r in methods.items():
    print(f"  {m}: cosine {r['cosine']:.5f}, relative L2 {r['relative_l2']:.4f}")
print(f"check: {time.time() - t:.0f} s", flush=True)
tokenizer, _ = check_tokenizer(comps.config)
runner = Runner(session, comps.config, tokenizer)
prompt = Prompt(text="Open the settings app and turn on dark mode, then go back to the home screen.")
t = time.time()
segs = runner.segments(prompt)
runner.prefill(segs)
prefill_s = time.time() - t
n = sum(s.length for s in segs)
times = []
start, pos = n, n
for k in range(8):
    t = time.time()
    emb = session.run("token_embedding", tokens=np.array([[1000 + k]], np.int64))
    runner.decode(emb, np.full((3, 1), pos, np.int64), start)
    times.append(time.time() - t)
    start += 1; pos += 1
print(f"prefill {n} tokens: {n / prefill_s:.2f} tok/s; decode: median {1 / np.median(times):.3f} tok/s over {len(times)} steps")
r = runner.generate(prompt, max_new_tokens=4, stop_at_eos=False)
print("generate tokens:", r.tokens)
print(f"total {time.time() - t0:.0f} s, peak RSS {peak_rss_mb() / 1024:.2f} GiB")
