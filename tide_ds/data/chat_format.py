"""Chat formats of the student and the teachers, tokenized with labels and per-message segments (docs/method.md §11).

A conversation is a list of ``{"role", "content"}`` messages (roles ``system``, ``user``, ``assistant``).
A :class:`ChatFormat` renders it as literal template strings around each message's content, so the
character range of every content ("segment") is known by construction, in message order — it is never
searched for (the reference's first-occurrence search, docs/method.md §15.3, cannot happen).

:func:`encode_chat` tokenizes the rendered text in one piece (as ``apply_chat_template`` would),
masks the prompt (labels -100 up to the last assistant content, docs/method.md §11.1), applies the docs/method.md §11.2 rules —
discard when the prompt fills ``max_length``, else cut on the right — and optionally EOS-pads to a
multiple of the block size (docs/method.md §2.1). Every discarded conversation is counted by reason in a :class:`DropCounter`.

Formats: :data:`QWEN3` (student; ChatML with the empty think block of ``enable_thinking=False`` before
the final assistant content), :data:`LLADA2` (``<role>HUMAN</role>…<|role_end|>`` turns, docs/models.md §3.5)
and :data:`WEDLM` (ChatML without a think block, docs/models.md §4.4).
"""

from __future__ import annotations

import collections
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerFast

from tide_ds.diffusion.layout import check_block_multiple, eos_block_pad
from tide_ds.diffusion.masking import IGNORE_INDEX

__all__ = [
    "LLADA2", "QWEN3", "ROLES", "WEDLM", "ChatFormat", "DropCounter", "EncodedChat", "Segment",
    "encode_chat", "normalize_messages",
]

ROLES = ("system", "user", "assistant")


@dataclass
class DropCounter:
    """Counts of conversations kept, kept but cut, and dropped by reason (also used for chunks and pairs)."""

    kept: int = 0
    truncated: int = 0
    dropped: collections.Counter[str] = field(default_factory=collections.Counter)

    def drop(self, reason: str, count: int = 1) -> None:
        self.dropped[reason] += count

    def keep(self, *, truncated: bool = False) -> None:
        self.kept += 1
        self.truncated += int(truncated)

    def update(self, other: DropCounter) -> None:
        """Add ``other``'s counts (e.g. from a worker process)."""
        self.kept += other.kept
        self.truncated += other.truncated
        self.dropped.update(other.dropped)

    def summary(self) -> str:
        reasons = ", ".join(f"{reason}={n}" for reason, n in sorted(self.dropped.items())) or "none"
        return f"kept {self.kept} ({self.truncated} truncated); dropped: {reasons}"


@dataclass(frozen=True)
class ChatFormat:
    """A chat template as literal strings; ``{role}`` in ``turn_prefix`` is replaced by ``role_names[role]``.

    A turn renders as ``turn_prefix + content + turn_suffix``; the last assistant turn (and the
    generation prompt) has ``final_assistant_prefix`` between prefix and content. ``default_system``,
    if set, is rendered as a system turn when the conversation has none (it is template, not a segment).
    """

    name: str
    turn_prefix: str
    turn_suffix: str
    role_names: Mapping[str, str]
    final_assistant_prefix: str = ""
    default_system: str | None = None

    def _prefix(self, role: str, *, final_assistant: bool) -> str:
        prefix = self.turn_prefix.format(role=self.role_names[role])
        return prefix + self.final_assistant_prefix if final_assistant else prefix

    def render(
        self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = False
    ) -> tuple[str, list[tuple[int, int]]]:
        """The text and the ``[start, end)`` character range of each message's content, in message order.

        Contents are used verbatim; call :func:`normalize_messages` first (``encode_chat`` does).
        """
        parts: list[str] = []
        ranges: list[tuple[int, int]] = []
        pos = 0

        def emit(text: str) -> None:
            nonlocal pos
            parts.append(text)
            pos += len(text)

        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            emit(self._prefix("system", final_assistant=False) + self.default_system + self.turn_suffix)
        for i, message in enumerate(messages):
            final = message["role"] == "assistant" and i == len(messages) - 1 and not add_generation_prompt
            emit(self._prefix(message["role"], final_assistant=final))
            ranges.append((pos, pos + len(message["content"])))
            emit(message["content"])
            emit(self.turn_suffix)
        if add_generation_prompt:
            emit(self._prefix("assistant", final_assistant=True))
        return "".join(parts), ranges


#: The student: Qwen3's template with ``enable_thinking=False`` (docs/method.md §11.1).
QWEN3 = ChatFormat(
    name="qwen3",
    turn_prefix="<|im_start|>{role}\n",
    turn_suffix="<|im_end|>\n",
    role_names={r: r for r in ROLES},
    final_assistant_prefix="<think>\n\n</think>\n\n",
)
#: LLaDA2.0 (Ling 2.0) turns; the default system prompt is the one LLaDA2.0's published prompts start with.
LLADA2 = ChatFormat(
    name="llada2",
    turn_prefix="<role>{role}</role>",
    turn_suffix="<|role_end|>",
    role_names={"system": "SYSTEM", "user": "HUMAN", "assistant": "ASSISTANT"},
    default_system="detailed thinking off",
)
#: WeDLM-8B-Instruct: Qwen ChatML without a think block (its own template; verify on first download).
WEDLM = ChatFormat(
    name="wedlm",
    turn_prefix="<|im_start|>{role}\n",
    turn_suffix="<|im_end|>\n",
    role_names={r: r for r in ROLES},
)


@dataclass(frozen=True)
class Segment:
    """One message's content inside an encoded chat: character, UTF-8 byte and token ranges (half-open).

    ``token_start:token_end`` are the tokens lying entirely inside the content, cut at the chat's
    ``length``; a token that also covers template text (e.g. ``"\\n\\n"`` across the boundary) is not in it.
    """

    message_index: int
    role: str
    char_start: int
    char_end: int
    byte_start: int
    byte_end: int
    token_start: int
    token_end: int


@dataclass(frozen=True)
class EncodedChat:
    """A tokenized conversation. ``input_ids``/``labels`` have ``length`` real tokens, then EOS block padding."""

    format: str
    text: str  # the rendered conversation, whose UTF-8 bytes the tokens spell
    input_ids: list[int]
    labels: list[int]  # -100 on the prompt; EOS padding is labelled (docs/method.md §2.1)
    prompt_len: int
    length: int  # tokens before EOS padding (after truncation)
    untruncated_length: int
    segments: tuple[Segment, ...]


def normalize_messages(messages: Sequence[Mapping[str, object]]) -> list[dict[str, str]] | str:
    """Validated messages with NFC content (as Qwen's tokenizers normalise), or the reason to drop them.

    The final assistant content loses its leading newlines, as in Qwen3's template; this is done here
    for every format so that all formats show byte-identical contents (the alignment relies on it).
    """
    if not messages:
        return "no_messages"
    out = []
    for message in messages:
        role, content = message.get("role"), message.get("content")
        if role not in ROLES or not isinstance(content, str):
            return "bad_message"
        out.append({"role": role, "content": unicodedata.normalize("NFC", content)})
    if out[-1]["role"] != "assistant":
        return "last_not_assistant"
    out[-1]["content"] = out[-1]["content"].lstrip("\n")
    return out


def _byte_offsets(text: str, char_positions: list[int]) -> list[int]:
    """UTF-8 byte offset of each (sorted) character position."""
    result, last_char, last_byte = [], 0, 0
    for c in char_positions:
        last_byte += len(text[last_char:c].encode("utf-8"))
        last_char = c
        result.append(last_byte)
    return result


def encode_chat(
    messages: Sequence[Mapping[str, object]],
    tokenizer: PreTrainedTokenizerFast,
    fmt: ChatFormat,
    *,
    max_length: int | None = None,
    block_size: int | None = None,
    counter: DropCounter | None = None,
) -> EncodedChat | None:
    """Tokenize ``messages`` in ``fmt``; None (counted in ``counter``) if the conversation is dropped.

    Drop reasons: ``no_messages``, ``bad_message`` (unknown role or non-string content),
    ``last_not_assistant`` (nothing to supervise), ``prompt_too_long`` (prompt tokens >= ``max_length``,
    docs/method.md §11.2). Longer conversations are cut to ``max_length`` tokens. With ``block_size``, EOS padding
    (the tokenizer's eos) follows up to a multiple of it; ``max_length`` must then be a multiple too.
    """
    counter = counter if counter is not None else DropCounter()
    if block_size is not None and max_length is not None:
        check_block_multiple(max_length, block_size, option="max_length")
    normalized = normalize_messages(messages)
    if isinstance(normalized, str):
        counter.drop(normalized)
        return None
    text, ranges = fmt.render(normalized)
    encoding = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    ids, offsets = list(encoding.ids), encoding.offsets
    # The prompt is everything before the last assistant content; a token straddling into it counts as prompt.
    last_start = ranges[-1][0]
    prompt_len = next((i for i, (start, _) in enumerate(offsets) if start >= last_start), len(ids))
    if max_length is not None and prompt_len >= max_length:
        counter.drop("prompt_too_long")
        return None
    length = len(ids) if max_length is None else min(len(ids), max_length)
    counter.keep(truncated=length < len(ids))
    labels = [IGNORE_INDEX] * prompt_len + ids[prompt_len:length]
    ids = ids[:length]
    segments = tuple(_segments(normalized, text, ranges, offsets, length))
    if block_size is not None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"EOS block padding needs an eos_token; the tokenizer {tokenizer.name_or_path!r} has none")
        ids, labels = eos_block_pad(ids, labels, block_size=block_size, eos_id=tokenizer.eos_token_id)
    return EncodedChat(
        format=fmt.name, text=text, input_ids=ids, labels=labels, prompt_len=prompt_len, length=length,
        untruncated_length=len(encoding.ids), segments=segments,
    )


def _segments(
    messages: list[dict[str, str]], text: str, ranges: list[tuple[int, int]],
    offsets: list[tuple[int, int]], length: int,
) -> list[Segment]:
    bytes_at = _byte_offsets(text, [c for r in ranges for c in r])
    segments, token = [], 0
    for i, ((c0, c1), message) in enumerate(zip(ranges, messages)):
        while token < len(offsets) and offsets[token][0] < c0:
            token += 1
        end = token
        while end < len(offsets) and offsets[end][1] <= c1 and offsets[end][0] < c1:
            end += 1
        segments.append(Segment(
            message_index=i, role=message["role"], char_start=c0, char_end=c1,
            byte_start=bytes_at[2 * i], byte_end=bytes_at[2 * i + 1],
            token_start=min(token, length), token_end=min(end, length),
        ))
        token = end
    return segments
