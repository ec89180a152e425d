"""The session: one onnxruntime.InferenceSession (CPU provider) per method, behind the runner's interface.

The session keeps the decoder's KV cache between calls, cut at ``cache_position[0]`` (the runner's
convention), so an empty past (P = 0) is the prefill and replaying at an earlier position overwrites the
cache there, as the eager cache does.

Where the artifact's genai_config.json says ``past_present_share_buffer`` (decoders whose attention is
``GroupQueryAttention``: every export since that graph), the cache is what onnxruntime-genai makes of it: one
``[1, kv, max_length, D]`` buffer per layer and key/value, bound with IO binding as both the past input and the
present output, which the kernel appends to in place; the attention mask's length (P + T) tells it where.
Otherwise (older artifacts) each call's presents ``[1, kv, P + T, D]`` come back as new arrays and are fed
in as the next call's past.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from core.artifact import Artifact
from core.errors import ArtifactError, BadInputError, RuntimeFailure
from targets.ort.graphs import decoder_feeds, graph_io, method_feeds

MODEL_FORMATS = ("onnx", "ort")


class OrtSession:
    """onnxruntime.InferenceSession (CPU provider) per method, behind the runner's Session interface."""

    def __init__(self, artifact: Artifact, model_format: str | None = "onnx"):
        """Open every method's ``<method>.<model_format>`` ("onnx" or "ort"; a leading dot is accepted)."""
        import onnxruntime as ort

        from exporter.model.config import ModelConfig

        requested = model_format
        model_format = (model_format or "onnx").lstrip(".")
        if model_format not in MODEL_FORMATS:
            raise BadInputError(f"ORT artifact model format must be 'onnx' or 'ort', not '{requested}'")
        self.config = ModelConfig.from_dict(artifact.metadata["model"])
        self.format = model_format
        self.provenance = f"ONNX Runtime {ort.__version__} CPU ({model_format}, {artifact.recipe})"
        self.sessions: dict[str, Any] = {}
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # the same graph transforms as the ORT-format conversion (ARM target keeps int8 QDQ int8)
        options.add_session_config_entry("session.qdqisint8allowed", "1")
        if model_format == "ort":
            options.add_session_config_entry("session.load_model_format", "ORT")
        for method in graph_io(self.config):
            path = artifact.dir / f"{method}.{model_format}"
            if not path.is_file():
                why = artifact.info.get("report", {}).get("ort_format", {}).get(method, "missing")
                raise ArtifactError(f"{artifact.dir}: no {path.name} in this ORT artifact ({why})")
            try:
                # NCHWc is x86-only and left out of the .ort conversion: leave it out here too
                self.sessions[method] = ort.InferenceSession(
                    str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=["NchwcTransformer"]
                )
            except Exception as e:
                raise RuntimeFailure(f"onnxruntime cannot load {path}: {str(e).splitlines()[0]}") from e
        t = self.config.text
        self._empty = np.zeros((1, t.num_kv_heads, 0, t.head_dim), np.float32)
        self.max_length = shared_buffer_length(artifact)
        self.kv: list[tuple[Any, Any]] = []
        if self.max_length and "text_decoder" in self.sessions:
            shape = [1, t.num_kv_heads, self.max_length, t.head_dim]
            self.kv = [(ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32),
                        ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32)) for _ in range(t.num_layers)]
            self._binding = self.sessions["text_decoder"].io_binding()
            self._logits = self.sessions["text_decoder"].get_outputs()[0].name
        self.reset()

    def reset(self) -> None:
        n = self.config.text.num_layers
        self.past: list[tuple[np.ndarray, np.ndarray]] = [(self._empty, self._empty)] * n
        self.cached = 0  # positions held in the cache

    def _decode_shared(self, embeds: np.ndarray, position_ids: np.ndarray, start: int) -> np.ndarray:
        """One decoder call on the shared buffers: the new tokens' keys and values are written at ``start``."""
        t = embeds.shape[1]
        if start + t > self.max_length:
            raise BadInputError(f"text_decoder: positions up to {start + t} do not fit this artifact's "
                                f"{self.max_length}-position KV cache (genai_config.json search.max_length)")
        io = self._binding
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        io.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, np.float32))
        io.bind_cpu_input("attention_mask", np.ones((1, start + t), np.int64))
        io.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids.reshape(3, 1, -1), np.int64))
        io.bind_output(self._logits)  # first: get_outputs() is in binding order
        for i, (k, v) in enumerate(self.kv):
            io.bind_ortvalue_input(f"past_key_values.{i}.key", k)
            io.bind_ortvalue_input(f"past_key_values.{i}.value", v)
            io.bind_ortvalue_output(f"present.{i}.key", k)
            io.bind_ortvalue_output(f"present.{i}.value", v)
        try:
            self.sessions["text_decoder"].run_with_iobinding(io)
        except Exception as e:
            raise RuntimeFailure(f"onnxruntime failed running text_decoder: {str(e).splitlines()[0]}") from e
        return io.get_outputs()[0].numpy()

    def _call(self, method: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if method not in self.sessions:
            raise BadInputError(f"this ORT artifact has no method '{method}' (it has: {', '.join(self.sessions)})")
        try:
            return self.sessions[method].run(None, feeds)
        except Exception as e:
            raise RuntimeFailure(f"onnxruntime failed running {method}: {str(e).splitlines()[0]}") from e

    def run(self, method: str, **inputs: np.ndarray) -> np.ndarray:
        cfg = self.config
        if method == "token_embedding":
            return self._call(method, method_feeds(method, inputs, cfg))[0]
        if method in ("vision_encoder", "audio_encoder"):
            out = self._call(method, method_feeds(method, inputs, cfg))[0]
            return out.reshape(1, -1, out.shape[-1])
        if method == "text_decoder":
            embeds = np.asarray(inputs["embeds"], np.float32)
            cache_position = np.asarray(inputs["cache_position"]).reshape(-1)
            start = int(cache_position[0]) if cache_position.size else 0
            if start > self.cached:
                raise RuntimeFailure(f"text_decoder: cache_position starts at {start} but only {self.cached} "
                                     "positions are cached")
            position_ids = np.asarray(inputs["position_ids"], np.int64)
            if self.kv:
                logits = self._decode_shared(embeds, position_ids, start)
            else:
                past = [(k[:, :, :start], v[:, :, :start]) for k, v in self.past]
                outs = self._call(method, decoder_feeds(embeds, position_ids, past))
                self.past = [(outs[1 + 2 * i], outs[2 + 2 * i]) for i in range(cfg.text.num_layers)]
                logits = outs[0]
            self.cached = start + embeds.shape[1]
            return logits
        raise BadInputError(f"unknown method '{method}'")


def shared_buffer_length(artifact: Artifact) -> int | None:
    """The KV buffer length (genai_config.json ``search.max_length``) where the artifact's genai config says
    its decoder runs on shared past/present buffers, else None."""
    try:
        search = json.loads((artifact.dir / "genai_config.json").read_text())["search"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return int(search["max_length"]) if search.get("past_present_share_buffer") else None
