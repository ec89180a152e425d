"""onnxruntime-genai on the ORT artifact folder exactly as exported (real og 0.18: og.Model, og.Tokenizer, og.Generator).

Nothing is added to the folder: the test asserts its listing before and after. Text goes through og's own
tokenizer (tokenizer.json + tokenizer_config.json with the chat template); an image goes in as the named
tensors of ``targets.ort.genai.genai_inputs`` (normalised pixels [1,3,S,S], grid, token count), and og runs
vision_encoder.onnx, the embedding splice and the 3-D positions itself. Expected tokens come from
``autoglm-export generate --artifact`` on the same folder.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from core.chat import render, user_message
from core.runner import Prompt, Runner, load_tokenizer
from core.artifact import read_artifact
from core.recipes import RecipeName
from targets import get_target
from targets.ort.genai import GENAI_CONFIG, genai_inputs, genai_usage

og = pytest.importorskip("onnxruntime_genai")

pytestmark = pytest.mark.slow

STEPS = 8


@pytest.fixture(scope="module")
def folder(exported):
    """The shared tiny fp32 ORT export (conftest), which og and these tests must leave as it is."""
    art = exported("ort", RecipeName.FP32)
    listing = sorted(p.name for p in art.dir.iterdir())
    assert listing == sorted(set(art.files) | {"artifact.json"})
    yield art
    # nothing was added to (or taken from) the folder by og or by these tests
    assert sorted(p.name for p in art.dir.iterdir()) == listing


@pytest.fixture(scope="module")
def model(folder):
    return og.Model(str(folder.dir))


@pytest.fixture(scope="module")
def runner(folder):
    """The host runner over the same folder (onnxruntime sessions on its .onnx files)."""
    from exporter.model.config import ModelConfig

    cfg = ModelConfig.from_dict(folder.metadata["model"])
    return Runner(get_target("ort").open(read_artifact(folder.dir)), cfg, load_tokenizer(cfg))


def _cli_tokens(folder, *args: str) -> list[int]:
    from cli import app

    result = CliRunner().invoke(app, ["generate", "--artifact", str(folder.dir), "--max-new-tokens", str(STEPS), *args])
    assert result.exit_code == 0, result.output
    found = re.search(r"^tokens: (\[.*\])$", result.output, re.M)
    assert found, result.output
    return json.loads(found.group(1))


def _og_greedy(model, feeds: dict[str, np.ndarray] | None = None, ids: list[int] | None = None):
    """og greedy generation (STEPS tokens at most, eos stops it): (tokens without eos, first-step logits, generator)."""
    prompt_len = feeds["input_ids"].shape[1] if feeds is not None else len(ids)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt_len + STEPS, do_sample=False)
    gen = og.Generator(model, params)
    if feeds is not None:
        named = og.NamedTensors()
        for name, value in feeds.items():
            named[name] = value
        gen.set_inputs(named)
    else:
        gen.append_tokens(np.asarray([ids], np.int32))
    first = np.asarray(gen.get_logits()).reshape(-1).copy()
    positions = np.asarray(gen.get_input("position_ids")).copy()
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out, first, positions


def _strip_eos(tokens: list[int], eos: list[int]) -> list[int]:
    return tokens[:-1] if tokens and tokens[-1] in eos else tokens


def test_folder_opens_with_og_model_and_tokenizer_and_its_ids_equal_ours(folder, model, runner):
    assert (folder.dir / "tokenizer_config.json").is_file() and (folder.dir / GENAI_CONFIG).is_file()
    tok = og.Tokenizer(model)
    for prompt in (Prompt(text="Set an alarm for seven."), Prompt(text="What is in this photo?", image=np.zeros(1))):
        message = user_message(prompt.text, image=prompt.image is not None)
        # og renders the chat template it reads from tokenizer_config.json: the runner's string
        rendered = tok.apply_chat_template(json.dumps([message]), add_generation_prompt=True)
        assert rendered == render(runner.template, [message], add_generation_prompt=True)
        ours = runner.prompt_ids(prompt)
        assert len(ours) > 5
        assert [int(i) for i in tok.encode(rendered)] == ours
    assert sorted(int(i) for i in tok.eos_token_ids) == sorted(runner.config.tokens.eos_ids)


def test_og_greedy_text_equals_cli_generate_artifact(folder, model, runner):
    prompt = "Set an alarm for seven."
    expected = _cli_tokens(folder, "--prompt", prompt)
    assert expected  # something to compare (eos did not end it at once)
    tok = og.Tokenizer(model)
    text = tok.apply_chat_template(json.dumps([user_message(prompt)]), add_generation_prompt=True)
    ids = [int(i) for i in tok.encode(text)]
    assert ids == runner.prompt_ids(Prompt(text=prompt))
    got, _, _ = _og_greedy(model, ids=ids)
    assert _strip_eos(got, list(runner.config.tokens.eos_ids)) == expected


def test_og_greedy_with_an_image_equals_cli_generate_artifact(folder, model, runner, media):
    cfg = runner.config
    expected = _cli_tokens(folder, "--prompt", media["prompt"], "--image", str(media["image"]))
    assert expected
    prompt = Prompt(text=media["prompt"], image=media["image"])
    feeds = genai_inputs(cfg, runner.prompt_ids(prompt), runner.pixels(media["image"]))
    segments = runner.segments(prompt)
    # the expanded ids are the runner's prompt layout: N placeholders where the image goes
    assert feeds["input_ids"][0].tolist() == [t for s in segments for t in s.tokens]
    assert feeds["input_ids"][0].tolist().count(cfg.tokens.image_token_id) == cfg.image_tokens > 1
    got, first, positions = _og_greedy(model, feeds)
    # og computed the runner's 3-D positions (an image grid, not a count) from image_grid_thw
    ours = np.concatenate([s.position_ids for s in segments], axis=1)
    assert not np.array_equal(ours[0], ours[1])
    np.testing.assert_array_equal(positions.reshape(3, -1), ours)
    # og ran vision_encoder.onnx and spliced its features: the first logits are the runner's
    ref = runner.generate(prompt, max_new_tokens=1, stop_at_eos=False).step_logits[0]
    np.testing.assert_allclose(first, ref, atol=1e-4, rtol=0)
    assert _strip_eos(got, list(cfg.tokens.eos_ids)) == expected


def test_without_the_image_the_logits_differ(model, runner, media):
    """The image named tensors matter: the same ids with the image's features left out give other logits."""
    cfg = runner.config
    prompt = Prompt(text=media["prompt"], image=media["image"])
    feeds = genai_inputs(cfg, runner.prompt_ids(prompt), runner.pixels(media["image"]))
    _, with_image, _ = _og_greedy(model, feeds)
    black = genai_inputs(cfg, runner.prompt_ids(prompt), np.zeros_like(feeds["pixel_values"]))
    _, other_image, _ = _og_greedy(model, black)
    assert np.abs(with_image - other_image).max() > 1e-3


def test_artifact_json_records_the_genai_version_and_how_to_feed_it(folder):
    info = folder.info
    assert info["runtime_versions"]["onnxruntime-genai"] == og.__version__
    genai = info["report"]["genai"]
    # the release this folder's layout was written and tested for is the one these tests ran: a new og needs a re-check
    assert genai["written_for"] == og.__version__
    assert genai["config"] == GENAI_CONFIG and genai["model_type"] == "qwen2_5_vl" and genai["loads"] is True
    cfg = json.loads((folder.dir / GENAI_CONFIG).read_text())["model"]
    assert cfg["type"] == genai["model_type"]
    s = folder.metadata["image_size"]
    assert genai["image"]["set_inputs"]["pixel_values"] == f"float32 [1, 3, {s}, {s}]"
    assert genai["image"]["set_inputs"]["num_image_tokens"] == [folder.metadata["image_tokens"]]
    assert "speech" not in cfg  # og opens no speech session for qwen2_5_vl; the report says what to do instead
    assert "onnxruntime directly" in genai["audio"]


def test_genai_own_processor_does_not_apply_to_this_folder(model):
    """As report.genai says: og's qwen2_5_vl processor is not for this vision graph (it needs Qwen's config)."""
    with pytest.raises(Exception, match="processor_config|json"):
        model.create_multimodal_processor()


def test_og_runs_no_speech_session_for_this_model_type(model, runner, media):
    """Why audio is not fed through og: audio named tensors change nothing (the placeholders keep token embeddings)."""
    cfg = runner.config
    prompt = Prompt(text=media["prompt"], audio=media["audio"])
    ids = [t for s in runner.segments(prompt) for t in s.tokens]
    plain = {"input_ids": np.asarray([ids], np.int32)}
    _, without, _ = _og_greedy(model, plain)
    audio = {**plain, "audio_embeds": runner.mel(media["audio"]), "audio_sizes": np.asarray([cfg.audio_tokens], np.int64)}
    _, with_audio, _ = _og_greedy(model, audio)
    np.testing.assert_array_equal(with_audio, without)
    ref = runner.generate(prompt, max_new_tokens=1, stop_at_eos=False).step_logits[0]
    assert np.abs(ref - with_audio).max() > 1e-3  # and they are not the runner's (which runs audio_encoder)


def test_genai_inputs_rejects_wrong_pixels_and_prompts(runner):
    from core.errors import BadInputError

    cfg = runner.config
    ids = runner.prompt_ids(Prompt(text="What is this?", image=np.zeros(1)))
    s = cfg.shape.image_size
    with pytest.raises(BadInputError, match="pixel_values"):
        genai_inputs(cfg, ids, np.zeros((1, 3, s // 2, s // 2), np.float32))
    with pytest.raises(BadInputError, match="placeholder"):
        genai_inputs(cfg, runner.prompt_ids(Prompt(text="no image here")), np.zeros((1, 3, s, s), np.float32))


def test_a_model_without_tokenizer_files_says_the_app_tokenizes():
    """A bare preset (the 9B widths without a checkpoint) ships no tokenizer: og.Tokenizer could not open it."""
    from exporter.model import get_preset

    cfg = get_preset("autoglm-phone-9b")
    bare = genai_usage(cfg, [])
    assert "no og.Tokenizer" in bare["text"] and "og.Tokenizer(model)" not in bare["text"]
    assert "og.Tokenizer(model)" in genai_usage(cfg, ["tokenizer.json", "tokenizer_config.json"])["text"]
    grid = cfg.shape.image_size // cfg.vision.patch_size
    assert bare["image"]["set_inputs"]["image_grid_thw"] == [[1, grid, grid]]
    assert bare["image"]["set_inputs"]["num_image_tokens"] == [(grid // cfg.vision.spatial_merge_size) ** 2]


def test_og_runs_an_int4_weight_folder_as_our_session_does(exported):
    """The int4-weight folder (MatMulNBits decoder, vision and audio) opens in og as exported, and og's greedy
    tokens equal ``generate --artifact`` on it."""
    import onnx

    from exporter.model.config import ModelConfig

    art = exported("ort", RecipeName.INT4_WEIGHT)
    listing = sorted(p.name for p in art.dir.iterdir())
    graph = onnx.load(art.dir / "text_decoder.onnx", load_external_data=False).graph
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) > 0  # the 4-bit program is what og runs
    cfg = ModelConfig.from_dict(art.metadata["model"])
    runner = Runner(get_target("ort").open(read_artifact(art.dir)), cfg, load_tokenizer(cfg))
    prompt = "Set an alarm for seven."
    expected = _cli_tokens(art, "--prompt", prompt)
    assert expected
    got, _, _ = _og_greedy(og.Model(str(art.dir)), ids=runner.prompt_ids(Prompt(text=prompt)))
    assert _strip_eos(got, list(cfg.tokens.eos_ids)) == expected
    assert sorted(p.name for p in art.dir.iterdir()) == listing  # og added nothing to the shared folder
