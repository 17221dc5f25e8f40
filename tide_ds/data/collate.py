"""One conversation -> one fixed-length row of the data contract (the per-sample work of the reference's collators).

The reference tokenized offline but aligned, cut and padded every example in its collators, each step
(docs/method.md §4.3, §11.3, pitfall docs/method.md §15.24). Here that work is done once, in preprocessing
(:mod:`tide_ds.data.preprocess`), and the trainer only stacks columns (:func:`tide_ds.data.loader.collate`).

Columns, all int32 (Legend: L student length, L_t teacher length, N = L pair slots):

* both pipelines: ``input_ids [L]``, ``labels [L]`` — student chat format, prompt labels -100, EOS block
  padding (labelled EOS) to a multiple of the block size, then pad ids with labels -100 (docs/method.md §2.1, §11.1);
  ``teacher_input_ids [L_t]`` (teacher pad id after the real tokens), ``teacher_attention_mask [L_t]``.
* pipeline A: ``student_chunk_ids [L]``, ``teacher_chunk_ids [L_t]`` (docs/design.md decision 4): chunk ids
  0..C-1 per sample, increasing along both sides, -1 = no chunk; every chunk has tokens on both sides
  spelling the same bytes (:func:`tide_ds.data.alignment.align_chats`). The teacher is cut after its
  last chunk (docs/method.md §4.3); a chunk cut by either length limit is dropped on both sides (docs/method.md §15.2).
* pipeline B: ``align_student [N]``, ``align_teacher [N]`` (positions holding the same token id,
  -1 padded) and ``n_aligned``; the teacher is cut after its last pair (docs/method.md §11.3 step 5), then EOS-padded
  to a multiple of the block size, the padding counted as real (docs/method.md §11.3 aligned collator).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tide_ds.data.alignment import TokenBytes, align_chats, aligned_pairs, verify_aligned_pairs
from tide_ds.data.chat_format import LLADA2, QWEN3, ROLES, WEDLM, DropCounter, EncodedChat, encode_chat
from tide_ds.data.tokenizers import load_tokenizer, resolve_special_ids
from tide_ds.diffusion.layout import check_block_multiple, eos_block_pad
from tide_ds.diffusion.masking import IGNORE_INDEX

__all__ = ["CHAT_FORMATS", "DEFAULT_TEACHER_FORMAT", "PIPELINE_COLUMNS", "ContractEncoder", "Stats", "check_messages",
           "contract_features"]

_STUDENT = ("input_ids", "labels")
_TEACHER = ("teacher_input_ids", "teacher_attention_mask")
PIPELINE_COLUMNS = {
    "A": _STUDENT + ("student_chunk_ids",) + _TEACHER + ("teacher_chunk_ids",),
    "B": _STUDENT + _TEACHER + ("align_student", "align_teacher", "n_aligned"),
}
CHAT_FORMATS = {f.name: f for f in (QWEN3, LLADA2, WEDLM)}
DEFAULT_TEACHER_FORMAT = {"A": "llada2", "B": "wedlm"}


class Stats:
    """Counts of a set of rows, summed when sets merge.

    ``counts`` keys: ``read``, ``kept/<split>``, ``dropped/<reason>``, ``event/<reason>`` (alignment
    events, e.g. a segment cut by a length limit; not row drops) and named token/chunk/pair sums;
    ``minima``/``maxima`` hold per-sample extremes. Round-trips through :meth:`to_json`.
    """

    def __init__(self, data: dict | None = None) -> None:
        data = data or {}
        self.counts: Counter[str] = Counter(data.get("counts", {}))
        self.minima: dict[str, int] = dict(data.get("minima", {}))
        self.maxima: dict[str, int] = dict(data.get("maxima", {}))
        self.events = DropCounter()  # filled by the alignment functions, moved into counts per kept row

    def add(self, **values: int) -> None:
        self.counts.update(values)

    def extreme(self, name: str, value: int) -> None:
        self.minima[name] = min(self.minima.get(name, value), value)
        self.maxima[name] = max(self.maxima.get(name, value), value)

    def merge(self, other: Stats) -> None:
        self.counts.update(other.counts)
        for name in other.minima:
            self.extreme(name, other.minima[name])
            self.extreme(name, other.maxima[name])

    def prefixed(self, prefix: str) -> dict[str, int]:
        """``{rest: count}`` of the keys ``prefix + rest``, sorted."""
        return {k[len(prefix):]: v for k, v in sorted(self.counts.items()) if k.startswith(prefix)}

    def to_json(self) -> dict:
        return {"counts": dict(sorted(self.counts.items())), "minima": self.minima, "maxima": self.maxima}


def check_messages(messages: object, control_tokens: Sequence[str] = ()) -> str | None:
    """The drop reason of a malformed conversation, or None if it can be encoded.

    Reasons: ``no_messages``, ``bad_message`` (not a mapping), ``missing_role``, ``unknown_role``,
    ``missing_content`` (absent or not a string), ``invalid_utf8`` (lone surrogates), ``empty_content``
    (a blank user or assistant message), ``control_token_in_content`` (text that a tokenizer would read
    as one of ``control_tokens``, e.g. ``<|im_end|>``), ``last_not_assistant`` (nothing to supervise).
    """
    if not isinstance(messages, list) or not messages:
        return "no_messages"
    for message in messages:
        if not isinstance(message, dict):
            return "bad_message"
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            return "missing_role"
        if role not in ROLES:
            return "unknown_role"
        if not isinstance(content, str):
            return "missing_content"
        try:
            content.encode("utf-8")
        except UnicodeEncodeError:  # e.g. from a JSON "\ud800" escape
            return "invalid_utf8"
        if role != "system" and not content.strip():
            return "empty_content"
        if any(token in content for token in control_tokens):
            return "control_token_in_content"
    return "last_not_assistant" if messages[-1]["role"] != "assistant" else None


def _padded(values, length: int, fill: int) -> np.ndarray:
    out = np.full(length, fill, dtype=np.int32)
    out[: len(values)] = values
    return out


def _contract_holds(s_chunks: np.ndarray, t_chunks: np.ndarray) -> bool:
    """Chunk ids 0..C-1 in order along both sides, every chunk on both sides (what ``align_chats`` promises)."""
    s_seq, t_seq = s_chunks[s_chunks >= 0], t_chunks[t_chunks >= 0]
    ids = np.arange(s_seq.max() + 1 if len(s_seq) else 0)
    return bool(np.all(np.diff(s_seq) >= 0) and np.all(np.diff(t_seq) >= 0)
                and np.array_equal(np.unique(s_seq), ids) and np.array_equal(np.unique(t_seq), ids))


class ContractEncoder:
    """Tokenizers, chat formats and byte tables for one pipeline; :meth:`encode` makes one row.

    Loading takes a few seconds (tokenizers, :class:`TokenBytes`); build one per process and reuse it.
    Pipeline B needs two tokenizers with the same regular vocabulary (ids are compared, docs/method.md §3.5).
    """

    def __init__(self, pipeline: str, *, student_tokenizer: str | Path, teacher_tokenizer: str | Path,
                 seq_len: int, teacher_seq_len: int, block_size: int, student_format: str = "qwen3",
                 teacher_format: str | None = None) -> None:
        if pipeline not in PIPELINE_COLUMNS:
            raise ValueError(f"--pipeline={pipeline!r} must be A (cross tokenizer) or B (shared tokenizer)")
        teacher_format = teacher_format or DEFAULT_TEACHER_FORMAT[pipeline]
        for option, name in (("--student-format", student_format), ("--teacher-format", teacher_format)):
            if name not in CHAT_FORMATS:
                raise ValueError(f"{option}={name!r} is not a chat format; expected one of {sorted(CHAT_FORMATS)}")
        check_block_multiple(seq_len, block_size, option="--seq-len")
        if pipeline == "B":  # the teacher is EOS-padded to whole blocks
            check_block_multiple(teacher_seq_len, block_size, option="--teacher-seq-len")
        elif teacher_seq_len < 1:
            raise ValueError(f"--teacher-seq-len={teacher_seq_len} must be positive")
        self.pipeline, self.seq_len, self.teacher_seq_len, self.block_size = pipeline, seq_len, teacher_seq_len, block_size
        self.student, self.teacher = load_tokenizer(student_tokenizer), load_tokenizer(teacher_tokenizer)
        self.student_fmt, self.teacher_fmt = CHAT_FORMATS[student_format], CHAT_FORMATS[teacher_format]
        self.pad_id = resolve_special_ids(self.student).pad_id
        self.teacher_eos = self.teacher.eos_token_id
        if self.teacher_eos is None:
            raise ValueError(f"--teacher-tokenizer={str(teacher_tokenizer)!r} has no eos_token; set one")
        self.teacher_pad = self.teacher.pad_token_id if self.teacher.pad_token_id is not None else self.teacher_eos
        vocab = [t.backend_tokenizer.get_vocab(with_added_tokens=False) for t in (self.student, self.teacher)] \
            if pipeline == "B" else [None, None]
        if vocab[0] != vocab[1]:
            raise ValueError(
                "--pipeline=B pairs positions that hold the same token id, so the student and teacher tokenizers "
                "must share their regular vocabulary (docs/method.md §3.5); use --pipeline=A for a teacher with another tokenizer"
            )
        self.student_bytes = TokenBytes.from_tokenizer(self.student)
        self.teacher_bytes = self.student_bytes if pipeline == "B" else TokenBytes.from_tokenizer(self.teacher)
        # Text spelling a special token would be read as that token (a template control), not as text.
        self.control_tokens = tuple(sorted({
            added.content for tok in (self.student, self.teacher) for added in tok.added_tokens_decoder.values()
            if added.special
        }))

    def encode(self, messages: object, stats: Stats) -> dict[str, np.ndarray] | None:
        """The row's columns (``PIPELINE_COLUMNS[pipeline]``), or None if dropped (the reason counted in ``stats``).

        Besides :func:`check_messages`' reasons: ``prompt_too_long`` (student prompt >= L, docs/method.md §11.2) and
        ``teacher_prompt_too_long`` (teacher prompt >= L_t: the teacher would see no response).
        """
        reason = check_messages(messages, self.control_tokens)
        if reason is None:
            drops, teacher_drops = DropCounter(), DropCounter()
            student = encode_chat(messages, self.student, self.student_fmt, max_length=self.seq_len,
                                  block_size=self.block_size, counter=drops)
            teacher = student and encode_chat(messages, self.teacher, self.teacher_fmt,
                                              max_length=self.teacher_seq_len, counter=teacher_drops)
            reasons = list(drops.dropped) + [f"teacher_{r}" for r in teacher_drops.dropped]
            reason = reasons[0] if reasons else None
        if reason is not None:
            stats.add(**{f"dropped/{reason}": 1})
            return None
        columns = self._chunks(student, teacher, stats) if self.pipeline == "A" else self._pairs(student, teacher, stats)
        columns["input_ids"] = _padded(student.input_ids, self.seq_len, self.pad_id)
        columns["labels"] = _padded(student.labels, self.seq_len, IGNORE_INDEX)
        stats.add(student_truncated=int(student.length < student.untruncated_length),
                  teacher_truncated=int(teacher.length < teacher.untruncated_length),
                  student_tokens=student.length, student_tokens_untruncated=student.untruncated_length,
                  student_labelled=int((columns["labels"] != IGNORE_INDEX).sum()),
                  # the teacher's text tokens, without pipeline B's EOS block padding (<= the untruncated count)
                  teacher_tokens=int(columns["teacher_attention_mask"].sum()) - int(columns.pop("teacher_padding", 0)),
                  teacher_tokens_untruncated=teacher.untruncated_length)
        stats.add(**{f"event/{k}": v for k, v in stats.events.dropped.items()})
        stats.events.dropped.clear()
        return {c: columns[c] for c in PIPELINE_COLUMNS[self.pipeline]}

    def _teacher_columns(self, ids: list[int]) -> dict[str, np.ndarray]:
        return {"teacher_input_ids": _padded(ids, self.teacher_seq_len, self.teacher_pad),
                "teacher_attention_mask": _padded(np.ones(len(ids), np.int32), self.teacher_seq_len, 0)}

    def _chunks(self, student: EncodedChat, teacher: EncodedChat, stats: Stats) -> dict[str, np.ndarray]:
        align = align_chats(student, teacher, self.student_bytes, self.teacher_bytes,
                            teacher_max_length=self.teacher_seq_len, counter=stats.events)
        s_chunks, t_chunks, n_chunks = align.student_chunk_ids, align.teacher_chunk_ids, align.num_chunks
        if not _contract_holds(s_chunks, t_chunks):  # never seen; the sample then trains with CE only
            stats.events.drop("chunk_contract_violation")
            s_chunks, t_chunks, n_chunks = np.full_like(s_chunks, -1), np.full_like(t_chunks, -1), 0
        columns = self._teacher_columns(teacher.input_ids[: align.teacher_length])
        columns["student_chunk_ids"] = _padded(s_chunks, self.seq_len, -1)
        columns["teacher_chunk_ids"] = _padded(t_chunks, self.teacher_seq_len, -1)
        # The response is the last message's content; the share of its bytes inside chunks is the coverage.
        last, lengths = student.segments[-1], self.student_bytes.lengths[np.asarray(student.input_ids)]
        in_response = np.zeros(len(s_chunks), dtype=bool)
        in_response[last.token_start:last.token_end] = True
        stats.add(chunks=n_chunks, samples_without_chunks=int(n_chunks == 0),
                  chunk_bytes=int(lengths[s_chunks >= 0].sum()), response_bytes=last.byte_end - last.byte_start,
                  response_bytes_in_chunks=int(lengths[(s_chunks >= 0) & in_response].sum()))
        stats.extreme("chunks_per_sample", n_chunks)
        return columns

    def _pairs(self, student: EncodedChat, teacher: EncodedChat, stats: Stats) -> dict[str, np.ndarray]:
        pairs = aligned_pairs(student, teacher, teacher_max_length=self.teacher_seq_len, counter=stats.events)
        t_ids = teacher.input_ids[: pairs.teacher_length]
        s_pos, t_pos = pairs.student_pos, pairs.teacher_pos
        mismatched = verify_aligned_pairs(student.input_ids, t_ids, s_pos, t_pos)
        if mismatched:  # never seen (the pairs come from a diff of ids); the sample then trains with CE only
            stats.events.drop("pair_id_mismatch", mismatched)
            s_pos, t_pos = s_pos[:0], t_pos[:0]
        unpadded = len(t_ids)
        t_ids, _ = eos_block_pad(t_ids, t_ids, block_size=self.block_size, eos_id=self.teacher_eos)
        columns = self._teacher_columns(t_ids)
        columns["teacher_padding"] = len(t_ids) - unpadded  # not a column: read (and removed) by encode()
        columns["align_student"] = _padded(s_pos, self.seq_len, -1)
        columns["align_teacher"] = _padded(t_pos, self.seq_len, -1)
        columns["n_aligned"] = np.int32(len(s_pos))
        last = student.segments[-1]
        stats.add(pairs=len(s_pos), samples_without_pairs=int(len(s_pos) == 0),
                  response_tokens=last.token_end - last.token_start,
                  response_tokens_paired=int(((s_pos >= last.token_start) & (s_pos < last.token_end)).sum()))
        stats.extreme("pairs_per_sample", len(s_pos))
        return columns


def contract_features(pipeline: str, *, seq_len: int, teacher_seq_len: int):
    """The ``datasets.Features`` of the rows: fixed-length int32 sequences, ``n_aligned`` an int32 scalar."""
    import datasets

    def column(name: str):
        if name == "n_aligned":
            return datasets.Value("int32")
        length = teacher_seq_len if name.startswith("teacher_") else seq_len
        return datasets.Sequence(datasets.Value("int32"), length=length)

    return datasets.Features({c: column(c) for c in PIPELINE_COLUMNS[pipeline]})
