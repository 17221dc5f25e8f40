"""Prompts in and text out: the student's chat template and the post-processing of docs/method.md §13.1 item 4 / docs/method.md §13.2.

A chat prompt is the Qwen3 template with the generation prompt and the empty think block of
``enable_thinking=False`` (``<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n``), optionally followed by
a task's ``gen_prefix`` (the start of the answer, as lm-evaluation-harness writes it). Outputs are
decoded without special tokens, ``<think>...</think>`` spans are removed and the text is cut at the
first stop string.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from tide_ds.data.chat_format import QWEN3

__all__ = ["chat_prompt", "cut_at_stops", "strip_think"]

_THINK = re.compile(r"<think>.*?</think>\n*", flags=re.DOTALL)  # newlines only: code indentation follows


def chat_prompt(user: str, *, system: str | None = None, gen_prefix: str = "") -> str:
    """The student's chat-formatted prompt for one user message, ending where the answer starts."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    text, _ = QWEN3.render(messages, add_generation_prompt=True)
    return text + gen_prefix


def strip_think(text: str) -> str:
    """Remove ``<think>...</think>`` spans (and an unterminated trailing ``<think>...``)."""
    text = _THINK.sub("", text)
    start = text.find("<think>")
    return text if start < 0 else text[:start]


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string (unchanged if none occurs)."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]
