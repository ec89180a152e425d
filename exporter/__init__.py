"""autoglm-export: multimodal GLM-4.1V on-device export toolchain."""

__version__ = "0.1.0"
