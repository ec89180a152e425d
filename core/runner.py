"""The host-side generation loop every backend shares.

The runner owns everything data-dependent, so exported graphs stay static:
tokenizing, laying the prompt out as segments (text, image block, audio
block), 3-D M-RoPE positions, prefill and decode, greedy or sampled.

Each segment is prefilled by its own ``text_decoder`` call, the convention of
ExecuTorch's stock multimodal runner; with a causal KV cache this equals one
prefill of the whole prompt. Position rule (transformers' Glm4v
``get_rope_index``): text positions are the same on all three axes and count
up; an image of g x g merged tokens starting at ``p`` gets (t, h, w) =
(p, p + row, p + col) and the text after it continues at ``p + g``; audio
tokens count up like text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generator, TYPE_CHECKING

import numpy as np

from core import preprocess
from core.chat import render, user_message
from core.errors import BadInputError
from exporter.model.config import ModelConfig
from exporter.model.templates import GLM_CHAT_TEMPLATE
from core.artifact import Session

if TYPE_CHECKING:  # an annotation only: the model code is not imported for it
    from core.components import Components


@dataclass
class Prompt:
    text: str
    image: str | Path | np.ndarray | None = None  # a file, or pixels [1,3,S,S]
    audio: str | Path | np.ndarray | None = None  # a file, or log-mel [1,n_mels,F]
    thinking: bool | None = None  # the template's enable_thinking (None: the template's default)
    # a whole conversation in the template's message form (media parts {"type": "image"|"audio"} where the image /
    # audio above goes); when given, it is rendered instead of one user turn of ``text`` (a server's multi-turn chat)
    messages: list[dict[str, Any]] | None = None


@dataclass
class Segment:
    kind: str  # "text" | "image" | "audio"
    tokens: list[int]  # ids (placeholders for media segments)
    position_ids: np.ndarray  # [3, n] int64
    data: np.ndarray | None = None  # pixels or mel for media segments

    @property
    def length(self) -> int:
        return len(self.tokens)


@dataclass
class GenerationResult:
    prompt_tokens: list[int]
    tokens: list[int]  # generated ids (eos not included)
    text: str
    prompt_logits: np.ndarray  # [T_prompt, V]: logits at every prompt position
    step_logits: np.ndarray  # [len(tokens) (+1 if stopped by eos), V]: logits each token was chosen from
    stopped_by_eos: bool = False
    timings: dict[str, float] = field(default_factory=dict)


def load_tokenizer(config: ModelConfig, path: str | Path | None = None):
    """The one place a runner's tokenizer is chosen: an explicit path, else the config's."""
    source = path or config.tokenizer
    if not source:
        raise BadInputError(f"model '{config.name}' has no tokenizer: put the model's tokenizer.json (and tokenizer_config.json) in its checkpoint directory")
    return preprocess.load_tokenizer(source)


class Runner:
    def __init__(self, session: Session, config: ModelConfig, tokenizer: Any):
        self.session = session
        self.config = config
        self.tokenizer = tokenizer

    # --- prompt layout -------------------------------------------------------------
    @property
    def template(self) -> str:
        return self.config.chat_template or GLM_CHAT_TEMPLATE

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """The ids of the rendered chat template, one placeholder token per image/audio (as apply_chat_template)."""
        extra = {} if prompt.thinking is None else {"enable_thinking": bool(prompt.thinking)}
        if prompt.messages is not None:
            messages = prompt.messages
        else:
            messages = [user_message(prompt.text, image=prompt.image is not None, audio=prompt.audio is not None)]
        text = render(self.template, messages, add_generation_prompt=True, **extra)
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def pixels(self, image: str | Path | np.ndarray) -> np.ndarray:
        cfg = self.config
        if cfg.vision is None:
            raise BadInputError(f"model '{cfg.name}' has no vision encoder; drop --image")
        if isinstance(image, np.ndarray) and image.ndim == 4:
            return image.astype(np.float32)
        return preprocess.image_to_pixels(image, cfg.shape.image_size, cfg.vision.image_mean, cfg.vision.image_std)

    def mel(self, audio: str | Path | np.ndarray) -> np.ndarray:
        cfg = self.config
        if cfg.audio is None:
            raise BadInputError(f"model '{cfg.name}' has no speech front-end; drop --audio")
        if isinstance(audio, np.ndarray) and audio.ndim == 3:
            return audio.astype(np.float32)
        return preprocess.audio_to_mel(audio, cfg.audio.n_mels, cfg.shape.audio_frames)

    def segments(self, prompt: Prompt) -> list[Segment]:
        """Lay the prompt out as segments with their 3-D positions.

        The chat template is rendered and tokenized; each image (audio) placeholder token becomes a media
        segment of the encoder's token count, the text between them text segments.
        """
        cfg, ids = self.config, self.config.tokens
        media = {}  # placeholder id -> (kind, preprocessed input)
        if prompt.image is not None:
            media[ids.image_token_id] = ("image", self.pixels(prompt.image))
        if prompt.audio is not None:
            media[ids.audio_token_id] = ("audio", self.mel(prompt.audio))
        found = {kind: 0 for kind, _ in media.values()}
        out: list[Segment] = []
        pos = 0
        pending: list[int] = []

        def flush_text() -> None:
            nonlocal pos, pending
            if pending:
                p = np.arange(pos, pos + len(pending), dtype=np.int64)
                out.append(Segment("text", pending, np.stack([p, p, p])))
                pos += len(pending)
                pending = []

        for tok in self.prompt_ids(prompt):
            if tok not in media:
                pending.append(tok)
                continue
            kind, data = media[tok]
            found[kind] += 1
            if found[kind] > 1:
                continue  # reported below
            flush_text()
            if kind == "image":
                g = cfg.image_grid // cfg.vision.spatial_merge_size
                rows, cols = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
                grid = np.stack([np.zeros(g * g, np.int64), rows.ravel(), cols.ravel()]).astype(np.int64) + pos
                out.append(Segment("image", [tok] * (g * g), grid, data))
                pos += g
            else:
                n = cfg.audio_tokens
                p = np.arange(pos, pos + n, dtype=np.int64)
                out.append(Segment("audio", [tok] * n, np.stack([p, p, p]), data))
                pos += n
        flush_text()
        for kind, n in found.items():
            if n != 1:
                raise BadInputError(
                    f"the chat template of '{cfg.name}' rendered {n} {kind} placeholders for one {kind}"
                    + (f" (it has no {kind} turn)" if n == 0 else " (is the placeholder token in the prompt text?)")
                )
        total = sum(s.length for s in out)
        if total >= cfg.shape.max_seq_len:
            raise BadInputError(f"prompt is {total} tokens; this model's max_seq_len is {cfg.shape.max_seq_len}")
        return out

    # --- running -----------------------------------------------------------------
    def embed(self, segment: Segment) -> np.ndarray:
        if segment.kind == "text":
            return self.session.run("token_embedding", tokens=np.asarray([segment.tokens], dtype=np.int64))
        if segment.kind == "image":
            return self.session.run("vision_encoder", pixels=segment.data)
        return self.session.run("audio_encoder", mel=segment.data)

    def decode(self, embeds: np.ndarray, position_ids: np.ndarray, start: int) -> np.ndarray:
        n = embeds.shape[1]
        cache_position = np.arange(start, start + n, dtype=np.int64)
        logits = self.session.run(
            "text_decoder", embeds=embeds, position_ids=np.ascontiguousarray(position_ids), cache_position=cache_position
        )
        return logits.reshape(n, -1)

    def prefill(self, segments: list[Segment]) -> np.ndarray:
        """Run every segment through the decoder; logits at every prompt position [T, V]."""
        self.session.reset()
        start = 0
        logits = []
        for seg in segments:
            logits.append(self.decode(self.embed(seg), seg.position_ids, start))
            start += seg.length
        return np.concatenate(logits, axis=0)

    def generate(
        self,
        prompt: Prompt,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop_at_eos: bool = True,
    ) -> GenerationResult:
        steps = self.stream(prompt, max_new_tokens, temperature, top_p, seed, stop_at_eos)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def stream(
        self,
        prompt: Prompt,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop_at_eos: bool = True,
    ) -> Generator[int, None, GenerationResult]:
        """The generation loop, one id at a time as each is chosen (a server streams them; generate drains it).

        The generator's return value (``StopIteration.value``) is the GenerationResult; closing it early stops
        the loop before the next decoder call (a client that went away).
        """
        segments = self.segments(prompt)
        prompt_tokens = [t for s in segments for t in s.tokens]
        prompt_logits = self.prefill(segments)
        rng = np.random.default_rng(seed)
        eos = set(self.config.tokens.eos_ids)
        start = len(prompt_tokens)
        next_pos = int(segments[-1].position_ids.max()) + 1
        tokens: list[int] = []
        step_logits = [prompt_logits[-1]]
        stopped = False
        budget = min(max_new_tokens, self.config.shape.max_seq_len - start)
        while True:
            tok = pick(step_logits[-1], temperature, top_p, rng)
            if stop_at_eos and tok in eos:
                stopped = True
                break
            tokens.append(tok)
            yield tok
            if len(tokens) >= budget:
                break
            emb = self.session.run("token_embedding", tokens=np.asarray([[tok]], dtype=np.int64))
            pos = np.full((3, 1), next_pos, dtype=np.int64)
            step_logits.append(self.decode(emb, pos, start)[-1])
            start += 1
            next_pos += 1
        if not stopped:
            step_logits = step_logits[: len(tokens)]
        return GenerationResult(
            prompt_tokens=prompt_tokens,
            tokens=tokens,
            text=self.tokenizer.decode(tokens, skip_special_tokens=False),
            prompt_logits=prompt_logits,
            step_logits=np.stack(step_logits) if step_logits else np.zeros((0, prompt_logits.shape[-1]), np.float32),
            stopped_by_eos=stopped,
        )


def pick(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy when temperature is 0, else temperature + nucleus sampling."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return int(rng.choice(len(p), p=p))


class EagerSession:
    """The PyTorch reference behind the Session interface (ground truth for parity)."""

    provenance = "PyTorch eager (fp32 reference)"

    def __init__(self, components: Components):
        import torch

        self._torch = torch
        self.components = components
        self.modules = components.methods()

    def run(self, method: str, **inputs: np.ndarray) -> np.ndarray:
        torch = self._torch
        module = self.modules[method]
        names = self.components.input_names(method)
        args = [torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in names]
        with torch.no_grad():
            return module(*args).float().numpy()

    def reset(self) -> None:
        self.components.text_decoder.cache.reset()
