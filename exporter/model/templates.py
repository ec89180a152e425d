"""Chat templates the presets carry (jinja, rendered as transformers renders ``apply_chat_template``).

A checkpoint brings its own template (tokenizer_config.json's ``chat_template``,
or chat_template.jinja); these are for models that have none of their own.
Media parts of a user turn render as one placeholder token between begin/end
markers; the host runner expands each placeholder into the method's token
count (as transformers' Glm4vProcessor does).

``GLM4V_CHAT_TEMPLATE`` follows GLM-4.1V-Thinking / AutoGLM-Phone: ``[gMASK]<sop>``,
role tokens each followed by a newline, and an assistant turn that opens with
``<think>``; ``enable_thinking=False`` closes the thinking block empty instead.

``GLM_CHAT_TEMPLATE`` is the same layout without the thinking block: the tiny
preset's (its tokenizer has no ``<think>`` token), and the layout used for a
GLM checkpoint that ships no template of its own.
"""

from __future__ import annotations

_USER_PARTS = (
    "{% if m.content is string %}{{ m.content }}{% else %}{% for item in m.content %}"
    "{% if item.type == 'image' %}<|begin_of_image|><|image|><|end_of_image|>"
    "{% elif item.type == 'video' %}<|begin_of_video|><|video|><|end_of_video|>"
    "{% elif item.type == 'audio' %}<|begin_of_audio|><|audio|><|end_of_audio|>"
    "{% elif item.type == 'text' %}{{ item.text }}{% endif %}{% endfor %}{% endif %}"
)

_TURNS = (
    "[gMASK]<sop>{% for m in messages %}"
    "{% if m.role == 'system' %}<|system|>{{ '\\n' }}{{ m.content }}"
    "{% elif m.role == 'user' %}<|user|>{{ '\\n' }}" + _USER_PARTS +
    "{% elif m.role == 'assistant' %}<|assistant|>{{ '\\n' }}{{ m.content }}"
    "{% elif m.role == 'observation' %}<|observation|>{{ '\\n' }}{{ m.content }}"
    "{% endif %}{% endfor %}"
)

GLM4V_CHAT_TEMPLATE = _TURNS + (
    "{% if add_generation_prompt %}<|assistant|>{{ '\\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>{{ '\\n' }}"
    "{% else %}<think>{% endif %}{% endif %}"
)

GLM_CHAT_TEMPLATE = _TURNS + "{% if add_generation_prompt %}<|assistant|>{{ '\\n' }}{% endif %}"
