"""Run the reference model over real samples once and keep what every target needs.

``collect_method_inputs`` drives the eager reference through the shared
runner (so preprocessing and prompt layout are exactly those used at parity
time) and records each method's inputs in call order. For the decoder it
also records the KV cache content before each call ("past"), which
explicit-past backends (ONNX Runtime) need to replay a call on its own.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np

from exporter.runner import EagerSession, Prompt, Runner

MethodInputs = dict[str, list[dict[str, Any]]]


class RecordingSession(EagerSession):
    """An EagerSession that keeps a copy of every call's inputs."""

    def __init__(self, components: Any, record_past: bool = True):
        super().__init__(components)
        self.calls: MethodInputs = {m: [] for m in self.modules}
        self.record_past = record_past

    def run(self, method: str, **inputs: np.ndarray) -> np.ndarray:
        rec = {k: np.array(v, copy=True) for k, v in inputs.items()}
        if method == "text_decoder" and self.record_past:
            cache = self.components.text_decoder.cache
            p = int(inputs["cache_position"][0])
            rec["past"] = [
                (getattr(cache, f"k_{i}")[:, :, :p].numpy().copy(), getattr(cache, f"v_{i}")[:, :, :p].numpy().copy())
                for i in range(cache.num_layers)
            ]
        self.calls[method].append(rec)
        return super().run(method, **inputs)


def collect_method_inputs(
    components: Any,
    prompts: Iterable[Prompt],
    tokenizer: Any,
    decode_steps: int = 4,
    record_past: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
) -> MethodInputs:
    """Each method's inputs, in call order, from running the reference over ``prompts``.

    Every prompt is prefilled segment by segment and then decoded greedily for
    ``decode_steps`` tokens, so decoder samples cover both prefill (T > 1) and
    decode (T = 1) calls.
    """
    prompts = list(prompts)
    session = RecordingSession(components, record_past=record_past)
    runner = Runner(session, components.config, tokenizer)
    for i, prompt in enumerate(prompts):
        runner.generate(prompt, max_new_tokens=decode_steps, stop_at_eos=False)
        if progress:
            progress("calibration samples", i + 1, len(prompts))
    return session.calls
