"""Shared fixtures: the tiny reference model and its components, built once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model():
    from exporter.model import build, get_preset

    return build(get_preset("tiny"))


@pytest.fixture(scope="session")
def tiny_components(tiny_model):
    from exporter.components import build_components

    return build_components(tiny_model)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    from exporter.runner import load_tokenizer

    return load_tokenizer(tiny_model.config)


@pytest.fixture(scope="session")
def tiny_calibration(tiny_components):
    """Real calibration samples (photos, recordings, prompts) through the reference runner, shared by every target."""
    from calibration.stats import record_builtin_inputs

    return record_builtin_inputs(tiny_components, limit=12)
