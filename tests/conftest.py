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
