"""Shared fixtures: the tiny reference model and its components, built once per session."""

from __future__ import annotations

import os

import pytest


def pytest_configure(config):
    # pytest 9 names a test by Node._id; pytest-xdist 3.8 (the newest) appends its --dist loadgroup suffix to
    # Node._nodeid, so no group below would hold and every worker would build every target's tiny exports
    # (measured: 19.8 min for the suite against 15.8 with the groups)
    if config.getoption("dist", "no") == "loadgroup" and int(pytest.__version__.split(".")[0]) >= 9:
        raise pytest.UsageError(f"pytest {pytest.__version__} breaks pytest-xdist's --dist loadgroup: install "
                                "pytest<9 (pyproject.toml's test extra)")
    # under pytest-xdist each worker gets its share of the cores, not all of them (no oversubscription)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


# Test files that share a target's tiny exports (the session fixture `exported`) run on one xdist worker, so each
# export is built once per suite; every other file is its own group (what --dist loadfile did).
TARGET_GROUPS = {
    "test_executorch.py": "executorch", "test_export_check.py": "executorch",
    "test_ort.py": "ort", "test_genai.py": "ort", "test_bench.py": "ort", "test_parity.py": "ort",
    "test_coreml.py": "coreml", "test_mil_interpreter.py": "coreml",
    "test_blockwise.py": "ort",  # ORT fp32 / int8-weight exports (its one ExecuTorch test: below)
}
# tests in other files that take one target's shared export: beside that target's files, not rebuilding it
TEST_GROUPS = {
    "test_blockwise_on_a_target_without_block_tensors_exits_2_before_any_work": "executorch",
    "test_executorch_streamed_decoder_equals_whole_export": "executorch",
    "test_streamed_artifact_equals_whole_export": "ort",
}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the marks (--dist loadgroup)
def pytest_collection_modifyitems(config, items):
    for item in items:
        file = item.path.name
        group = TEST_GROUPS.get(getattr(item, "originalname", item.name)) or TARGET_GROUPS.get(file, file)
        if file == "test_targets.py":  # the conformance suite: each target's cases beside that target's files
            params = getattr(getattr(item, "callspec", None), "params", {})
            group = next((TARGET_GROUPS.get(f"test_{v}.py", v) for v in params.values() if f"test_{v}.py" in TARGET_GROUPS), file)
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def tiny_model():
    from exporter.model import build, get_preset

    return build(get_preset("tiny"))


@pytest.fixture(scope="session")
def tiny_components(tiny_model):
    from core.components import build_components

    return build_components(tiny_model)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    from core.runner import load_tokenizer

    return load_tokenizer(tiny_model.config)


@pytest.fixture(scope="session")
def tiny_calibration(tiny_components):
    """Real calibration samples (photos, recordings, prompts) through the reference runner, shared by every target."""
    from calibration.stats import record_builtin_inputs

    return record_builtin_inputs(tiny_components, limit=12)


@pytest.fixture(scope="session")
def media():
    """The held-out sample prompt, photo and recording (never seen by calibration)."""
    from core.dataset import sample_inputs

    return sample_inputs()


@pytest.fixture(scope="session")
def eager_run(tiny_components, tiny_tokenizer, media):
    """The eager reference over the held-out prompt with image and audio: runner, segments, 6 greedy tokens."""
    from core.runner import EagerSession, Prompt, Runner

    runner = Runner(EagerSession(tiny_components), tiny_components.config, tiny_tokenizer)
    prompt = Prompt(text=media["prompt"], image=media["image"], audio=media["audio"])
    segments = runner.segments(prompt)
    result = runner.generate(prompt, max_new_tokens=6, stop_at_eos=False)
    return {"runner": runner, "prompt": prompt, "segments": segments, "result": result}


@pytest.fixture(scope="session")
def exported(tiny_components, tiny_calibration, tmp_path_factory):
    """``exported(target, recipe)``: the tiny preset exported through the one lifecycle (targets.lifecycle),
    each target x recipe built once per test session (per xdist worker) and shared by every test file.

    Tests must not modify what it returns (copy the directory first)."""
    from core.recipes import Recipe
    from targets import get_target
    from targets.lifecycle import export

    root = tmp_path_factory.mktemp("exported")
    cache: dict[tuple[str, str], object] = {}

    def get(target: str, recipe: str):
        key = (target, recipe)
        if key not in cache:
            rec = Recipe(recipe)
            tiny_components.text_decoder.cache.reset()
            cache[key] = export(get_target(target), tiny_components, rec, root / f"{target}-{recipe}",
                                calibration=tiny_calibration if rec.needs_calibration else None,
                                source={"preset": "tiny", "layers": None})  # as `export --preset tiny` records it
        return cache[key]

    return get
