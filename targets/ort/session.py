"""The session: one onnxruntime.InferenceSession (CPU provider) per method, behind the runner's interface.

The session keeps the decoder's presents between calls and slices them to ``cache_position[0]`` (the
runner's convention), so an empty past (P = 0) is the prefill and replaying at an earlier position
overwrites the cache there, as the eager cache does.
"""

from __future__ import annotations

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
        self.reset()

    def reset(self) -> None:
        n = self.config.text.num_layers
        self.past: list[tuple[np.ndarray, np.ndarray]] = [(self._empty, self._empty)] * n

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
            have = self.past[0][0].shape[2]
            if start > have:
                raise RuntimeFailure(f"text_decoder: cache_position starts at {start} but only {have} positions are cached")
            past = [(k[:, :, :start], v[:, :, :start]) for k, v in self.past]
            outs = self._call(method, decoder_feeds(embeds, np.asarray(inputs["position_ids"], np.int64), past))
            n = cfg.text.num_layers
            self.past = [(outs[1 + 2 * i], outs[2 + 2 * i]) for i in range(n)]
            return outs[0]
        raise BadInputError(f"unknown method '{method}'")
