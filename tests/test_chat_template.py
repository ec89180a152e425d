"""Prompts are the checkpoint's own chat template, token for token as transformers lays them out.

A random Glm4v checkpoint written by transformers (no gmask/sop ids, ``bos_token_id: null`` in config.json),
with a GLM chat template in tokenizer_config.json and the tiny preset's tokenizer.json (GLM's special tokens):
``generate --checkpoint`` must prompt with ``apply_chat_template``'s ids and produce transformers' greedy tokens.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli import app
from exporter.model.templates import GLM4V_CHAT_TEMPLATE
from glm_checkpoint import ID, tokenizer_files, write_glm_checkpoint

transformers = pytest.importorskip("transformers")

PROMPT = "Open the settings and turn on Wi-Fi."


@pytest.fixture(scope="module")
def glm_ckpt(tmp_path_factory):
    """transformers writes the model; config.json has no eos, bos, gmask or sop ids (the fallback is tested)."""
    d = tmp_path_factory.mktemp("glm_ckpt")
    hf = write_glm_checkpoint(d)
    raw = json.loads((d / "config.json").read_text())
    for section in (raw, raw.get("text_config", {})):
        for key in ("eos_token_id", "gmask_token_id", "sop_token_id"):
            section.pop(key, None)
        section["bos_token_id"] = None
    (d / "config.json").write_text(json.dumps(raw))
    (d / "generation_config.json").unlink(missing_ok=True)
    return d, hf


def _hf_ids(d, **kw):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(d))
    out = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, **kw)
    ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
    return [int(i) for i in (ids[0] if ids and isinstance(ids[0], list) else ids)]


def _ours(d, *args):
    r = CliRunner().invoke(app, ["generate", "--checkpoint", str(d), "--prompt", PROMPT, *args])
    assert r.exit_code == 0, r.output
    return json.loads(re.search(r"tokens: (\[.*\])", r.output).group(1))


def test_checkpoint_config_takes_template_and_eos_from_tokenizer_config(glm_ckpt):
    from exporter.checkpoint import config_from_checkpoint

    d, _ = glm_ckpt
    cfg = config_from_checkpoint(d)
    assert cfg.chat_template == GLM4V_CHAT_TEMPLATE
    assert cfg.tokens.eos_ids == (ID["<|endoftext|>"],)  # from tokenizer_config.json's eos_token
    assert cfg.tokens.bos_ids == (ID["[gMASK]"], ID["<sop>"])  # the template's fixed prefix


@pytest.mark.parametrize("thinking", [None, False])
def test_prompt_ids_equal_apply_chat_template(glm_ckpt, thinking):
    from exporter.checkpoint import config_from_checkpoint
    from core.runner import Prompt, Runner, load_tokenizer

    d, _ = glm_ckpt
    cfg = config_from_checkpoint(d)
    runner = Runner(None, cfg, load_tokenizer(cfg))
    ours = [t for s in runner.segments(Prompt(PROMPT, thinking=thinking)) for t in s.tokens]
    theirs = _hf_ids(d, **({} if thinking is None else {"enable_thinking": thinking}))
    assert ours == theirs
    assert theirs[:3] == [ID["[gMASK]"], ID["<sop>"], ID["<|user|>"]]  # what the old layout lacked for real checkpoints


def test_image_turn_is_the_templates_placeholder_expanded(glm_ckpt):
    from transformers import AutoTokenizer

    from exporter.checkpoint import config_from_checkpoint
    from core.runner import Prompt, Runner, load_tokenizer

    d, _ = glm_ckpt
    cfg = config_from_checkpoint(d)
    runner = Runner(None, cfg, load_tokenizer(cfg))
    s = cfg.shape.image_size
    segs = runner.segments(Prompt(PROMPT, image=np.zeros((1, 3, s, s), np.float32)))
    assert [seg.kind for seg in segs] == ["text", "image", "text"]
    collapsed = [t for seg in segs for t in (seg.tokens[:1] if seg.kind == "image" else seg.tokens)]
    tok = AutoTokenizer.from_pretrained(str(d))
    msg = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    out = tok.apply_chat_template(msg, add_generation_prompt=True)
    theirs = out["input_ids"] if hasattr(out, "keys") else out
    assert collapsed == list(theirs)
    assert segs[1].length == cfg.image_tokens


@pytest.mark.parametrize("flag", [[], ["--no-thinking"]])
def test_generate_checkpoint_equals_transformers_greedy(glm_ckpt, flag):
    d, hf = glm_ckpt
    ids = _hf_ids(d, **({"enable_thinking": False} if flag else {}))
    n = 8
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None)
    theirs = out[0, len(ids):].tolist()
    ours = _ours(d, "--max-new-tokens", str(n), *flag)
    eos = ID["<|endoftext|>"]
    cut = theirs.index(eos) if eos in theirs else n
    assert ours == theirs[:cut]
    assert len(ours) >= 3  # a prompt where stopping early would hide a difference


def test_thinking_flag_refused_without_a_switch(tmp_path):
    r = CliRunner().invoke(app, ["generate", "--prompt", "hi", "--thinking"])  # tiny's template has no switch
    assert r.exit_code == 2
    assert "no thinking switch" in r.output


def test_checkpoint_without_any_eos_is_one_line_error(glm_ckpt, tmp_path):
    d, _ = glm_ckpt
    bad = tmp_path / "noeos"
    shutil.copytree(d, bad)
    tokenizer_files(bad, eos=False)
    r = CliRunner().invoke(app, ["generate", "--checkpoint", str(bad), "--prompt", "hi"])
    assert r.exit_code == 2
    assert "eos" in r.output and "Traceback" not in r.output
