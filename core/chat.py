"""Chat templates: read a checkpoint's, render one as transformers' ``apply_chat_template`` does.

The template is jinja, rendered in the sandboxed environment transformers uses
(``trim_blocks``, ``lstrip_blocks``, loop controls, ``raise_exception``), so the
string, and after tokenizing it the ids, are the ones
``tokenizer.apply_chat_template(messages, add_generation_prompt=True)`` gives.
A template's thinking switch is the ``enable_thinking`` variable
(GLM-4.1V-Thinking, AutoGLM, Qwen3).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from core.errors import BadInputError, CheckpointError

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"


def read_template(folder: Path) -> str:
    """The chat template a checkpoint folder carries ("" if none): chat_template.jinja, else tokenizer_config.json."""
    jinja = folder / TEMPLATE_FILE
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{jinja}: unreadable chat template: {e}") from None
    cfg = read_tokenizer_config(folder)
    tpl = cfg.get("chat_template", "")
    if isinstance(tpl, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template", "") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default", next(iter(named.values()), ""))
    if not isinstance(tpl, str):
        raise CheckpointError(f"{folder / TOKENIZER_CONFIG}: chat_template is not a string")
    return tpl


def read_tokenizer_config(folder: Path) -> dict[str, Any]:
    path = folder / TOKENIZER_CONFIG
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return cfg


def token_content(value: Any) -> str | None:
    """A special-token entry of tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def has_thinking_switch(template: str) -> bool:
    return "enable_thinking" in template


@lru_cache(maxsize=16)
def _compile(template: str):
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise BadInputError(f"chat template does not parse: {e}") from None


def render(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **variables: Any) -> str:
    """The prompt text for ``messages`` (variables such as enable_thinking, bos_token pass through)."""
    from jinja2 import TemplateError

    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except TemplateError as e:
        raise BadInputError(f"chat template failed to render: {e}") from None


def user_message(text: str, image: bool = False, audio: bool = False) -> dict[str, Any]:
    """One user turn as transformers' processors take it: media parts first, then the text."""
    if not image and not audio:
        return {"role": "user", "content": text}
    parts: list[dict[str, Any]] = []
    if image:
        parts.append({"type": "image"})
    if audio:
        parts.append({"type": "audio"})
    parts.append({"type": "text", "text": text})
    return {"role": "user", "content": parts}
