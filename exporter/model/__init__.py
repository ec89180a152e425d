"""The reference model: config + presets, parts, and ``build(config)``."""

from exporter.model.config import PRESETS, ModelConfig, get_preset
from exporter.model.multimodal import MultimodalModel, build

__all__ = ["PRESETS", "ModelConfig", "MultimodalModel", "build", "get_preset"]
