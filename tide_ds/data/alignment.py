"""Cross-tokenizer chunk alignment (pipeline A, docs/method.md §4.2) and shared-tokenizer position pairs (pipeline B, docs/method.md §11.3).

**Chunks.** Inside one message's content the two tokenizations spell the same UTF-8 bytes. A *chunk* is
the smallest span of tokens on both sides whose byte boundaries coincide: every common token boundary
closes a chunk. The result is a chunk id per token on each side (docs/design.md decision 4), -1 for tokens in
no chunk (template tokens, EOS padding, tokens straddling a content edge, text cut by a length limit).
Token bytes come from the vocabulary (:class:`TokenBytes`): byte-level BPE strings through the GPT-2
byte alphabet, SentencePiece pieces with ``▁`` as a space and ``<0xAB>`` byte-fallback pieces as
that byte. Added tokens are atomic: a chunk that holds one is kept only if it is that same token
alone on both sides. Equal bytes per chunk hold by construction, so the reference's string check
(docs/method.md §4.2 step 3) becomes a check that the tokens spell the rendered text; a segment where they do not
(e.g. a literal ``▁`` read back by SentencePiece as a space) gets no chunks and is counted.

**Truncation.** A length limit keeps only the chunks lying entirely before it on *both* sides, so no
chunk is ever kept half (docs/method.md §15.2); the teacher is cut after its last chunk, as in the docs/method.md §4.3 collator.

**Pairs.** For pipeline B the student and teacher formats share the tokenizer; the tokens of each
assistant content are paired by a diff of the two id sequences, so every pair has equal ids (docs/method.md §15.4)
and tokens without a partner are counted instead of shifting later pairs.

Legend: L student length, L_t teacher length, N pairs, V vocabulary.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from tide_ds.data.chat_format import DropCounter, EncodedChat, Segment

__all__ = ["AlignedPairs", "ChunkAlignment", "TokenBytes", "align_chats", "align_spans", "align_tokens",
           "aligned_pairs", "verify_aligned_pairs"]

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclass(frozen=True, eq=False)
class TokenBytes:
    """The UTF-8 bytes each token id of a tokenizer spells.

    ``lengths``: int64 [V], byte length per id (0 where unknown); ``atomic``: bool [V], added tokens
    (split off before the model runs, never merged with text); ``known``: bool [V], False for ids whose
    bytes cannot be told (``<unk>``, ids outside the vocabulary).
    """

    pieces: tuple[bytes, ...]
    lengths: np.ndarray
    atomic: np.ndarray
    known: np.ndarray

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerFast) -> TokenBytes:
        """Build the table (about 0.5 s for 250k tokens); build it once per tokenizer and reuse it."""
        backend = tokenizer.backend_tokenizer
        byte_level = backend.decoder is not None and b'"ByteLevel"' in backend.decoder.__getstate__()
        byte_fallback = bool(getattr(backend.model, "byte_fallback", False))
        size = max(backend.get_vocab_size(with_added_tokens=True), len(tokenizer))
        pieces: list[bytes] = [b""] * size
        known = np.zeros(size, dtype=bool)
        atomic = np.zeros(size, dtype=bool)
        byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        for token, token_id in backend.get_vocab(with_added_tokens=False).items():
            if byte_level:
                pieces[token_id] = bytes(byte_decoder[c] for c in token)
            elif byte_fallback and (m := _BYTE_PIECE.fullmatch(token)):
                pieces[token_id] = bytes([int(m.group(1), 16)])
            else:
                pieces[token_id] = token.replace("\u2581", " ").encode("utf-8")
            known[token_id] = True
        for token_id, added in tokenizer.added_tokens_decoder.items():
            pieces[token_id] = added.content.encode("utf-8")
            known[token_id] = atomic[token_id] = True
        model_unk = getattr(backend.model, "unk_token", None)
        for unk_id in (tokenizer.unk_token_id, backend.token_to_id(model_unk) if model_unk else None):
            if unk_id is not None:  # an unknown piece spells unknown bytes
                known[unk_id] = False
                pieces[unk_id] = b""
        lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=size) * known
        return cls(pieces=tuple(pieces), lengths=lengths, atomic=atomic, known=known)

    def offsets(self, ids: list[int] | np.ndarray) -> np.ndarray:
        """Byte offset of each token boundary: int64 [n + 1], ``offsets[i]`` = start of token i."""
        return np.concatenate([[0], np.cumsum(self.lengths[np.asarray(ids, dtype=np.int64)])])

    def spelled(self, ids: list[int] | np.ndarray) -> bytes:
        """The bytes the tokens spell, concatenated."""
        return b"".join(self.pieces[i] for i in ids)

    def atomic_of(self, ids: list[int] | np.ndarray) -> np.ndarray:
        """bool [n]: which of the tokens are added (atomic) tokens."""
        return self.atomic[np.asarray(ids, dtype=np.int64)]

    def exact_prefix(self, ids: list[int], text: str) -> tuple[int, bool]:
        """``(n, whole)``: the tokens spell the first ``n`` bytes of ``text`` correctly; ``whole`` is True if
        they spell a prefix of it entirely (cut by truncation at most), False if they go wrong at byte ``n``."""
        ids_arr = np.asarray(ids, dtype=np.int64)
        unknown = np.flatnonzero(~self.known[ids_arr]) if len(ids_arr) else np.zeros(0, dtype=np.int64)
        limit = len(ids_arr) if len(unknown) == 0 else int(unknown[0])
        spelled, rendered = self.spelled(ids_arr[:limit]), text.encode("utf-8")
        if rendered.startswith(spelled):
            return len(spelled), limit == len(ids_arr)
        n = next((i for i, (a, b) in enumerate(zip(spelled, rendered)) if a != b), min(len(spelled), len(rendered)))
        return n, False


class ChunkAlignment(NamedTuple):
    """Chunk ids 0..num_chunks-1 per token, increasing along each sequence; -1 = in no chunk."""

    student_chunk_ids: np.ndarray  # int32 [L] (len(student.input_ids), EOS padding included)
    teacher_chunk_ids: np.ndarray  # int32 [L_t] (L_t = teacher_length)
    num_chunks: int
    teacher_length: int  # the teacher is cut here: end of its last chunk, at most teacher_max_length


class AlignedPairs(NamedTuple):
    """Pair k: student position ``student_pos[k]`` and teacher position ``teacher_pos[k]`` hold the same id."""

    student_pos: np.ndarray  # int32 [N], increasing
    teacher_pos: np.ndarray  # int32 [N], increasing
    teacher_length: int  # the teacher is cut here: last paired position + 1 (docs/method.md §11.3 step 5)


def align_spans(offsets_a: np.ndarray, offsets_b: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Chunks of two contiguous token runs over the same bytes.

    ``offsets_x``: int64 [n_x + 1], token boundaries of side x relative to the segment start (token i
    spans ``[offsets_x[i], offsets_x[i+1])``). Chunk k spans the bytes between the k-th and (k+1)-th
    boundary common to both sides. Returns int32 chunk ids [n_a], [n_b] (-1 for tokens before the first
    or after the last common boundary) and the number of chunks.
    """
    common = np.intersect1d(offsets_a, offsets_b)
    n_chunks = max(len(common) - 1, 0)

    def chunk_of(offsets: np.ndarray) -> np.ndarray:
        starts, ends = offsets[:-1], offsets[1:]
        if n_chunks == 0:
            return np.full(len(starts), -1, dtype=np.int32)
        k = np.searchsorted(common, starts, side="right") - 1  # last common boundary at or before the start
        inside = (k >= 0) & (k < n_chunks) & (ends <= common[np.clip(k + 1, 0, n_chunks)])
        return np.where(inside, k, -1).astype(np.int32)

    return chunk_of(offsets_a), chunk_of(offsets_b), n_chunks


def _drop_mixed_atomic(ids_a: np.ndarray, ids_b: np.ndarray, atomic_a: np.ndarray, atomic_b: np.ndarray,
                       n_chunks: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Unset chunks holding an added token unless it is one such token on each side; renumber 0..C'-1."""
    if n_chunks == 0:
        return ids_a, ids_b, 0, 0

    def counts(ids: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        valid = ids >= 0
        w = None if weights is None else weights[valid].astype(np.int64)
        return np.bincount(ids[valid], weights=w, minlength=n_chunks).astype(np.int64)

    size_a, size_b = counts(ids_a), counts(ids_b)
    special_a, special_b = counts(ids_a, atomic_a), counts(ids_b, atomic_b)
    paired = (size_a == 1) & (size_b == 1) & (special_a == 1) & (special_b == 1)
    keep = ((special_a + special_b) == 0) | paired
    new_id = np.where(keep, np.cumsum(keep) - 1, -1).astype(np.int32)

    def relabel(ids: np.ndarray) -> np.ndarray:
        return np.where(ids >= 0, new_id[np.maximum(ids, 0)], -1).astype(np.int32)

    return relabel(ids_a), relabel(ids_b), int(keep.sum()), int(n_chunks - keep.sum())


def align_tokens(ids_a: list[int], ids_b: list[int], bytes_a: TokenBytes, bytes_b: TokenBytes
                 ) -> tuple[np.ndarray, np.ndarray, int]:
    """Chunks of two complete tokenizations of one text (no template): int32 ids [n_a], [n_b], count.

    Raises ``ValueError`` if the two sides do not spell the same number of bytes.
    """
    off_a, off_b = bytes_a.offsets(ids_a), bytes_b.offsets(ids_b)
    if off_a[-1] != off_b[-1]:
        raise ValueError(
            f"align_tokens: the two token lists spell {off_a[-1]} and {off_b[-1]} bytes; expected the same text"
        )
    chunk_a, chunk_b, n = align_spans(off_a, off_b)
    chunk_a, chunk_b, n, _ = _drop_mixed_atomic(chunk_a, chunk_b, bytes_a.atomic_of(ids_a), bytes_b.atomic_of(ids_b), n)
    return chunk_a, chunk_b, n


def _tokens_inside(offsets: np.ndarray, start: int, end: int, limit: int) -> tuple[int, int]:
    """Token range ``[i0, i1)`` of the tokens lying entirely inside bytes ``[start, end)`` and before ``limit``."""
    i0 = min(int(np.searchsorted(offsets[:-1], start, side="left")), limit)
    i1 = min(int(np.searchsorted(offsets[1:], end, side="right")), limit)
    return i0, max(i0, i1)


def align_chats(
    student: EncodedChat,
    teacher: EncodedChat,
    student_bytes: TokenBytes,
    teacher_bytes: TokenBytes,
    *,
    teacher_max_length: int | None = None,
    counter: DropCounter | None = None,
) -> ChunkAlignment:
    """Chunk alignment of one conversation encoded in two formats (pipeline A, docs/method.md §4.2 per segment).

    Segments pair up by message index. Counted in ``counter``: ``segment_text_differs`` (the two
    formats show different content), ``segment_not_spelled`` (the tokens do not spell the content),
    ``segment_cut`` (a length limit falls inside the content: its partial chunk is dropped on both
    sides), ``chunk_atomic_mismatch`` (a chunk holding an added token not matched on the other side).
    """
    counter = counter if counter is not None else DropCounter()
    if [s.message_index for s in student.segments] != [s.message_index for s in teacher.segments]:
        raise ValueError("align_chats: the student and teacher encodings hold different messages")
    t_limit = teacher.length if teacher_max_length is None else min(teacher.length, teacher_max_length)
    s_ids, t_ids = student.input_ids[: student.length], teacher.input_ids[: teacher.length]
    s_off, t_off = student_bytes.offsets(s_ids), teacher_bytes.offsets(t_ids)
    s_exact, t_exact = student_bytes.exact_prefix(s_ids, student.text), teacher_bytes.exact_prefix(t_ids, teacher.text)
    s_atomic, t_atomic = student_bytes.atomic_of(s_ids), teacher_bytes.atomic_of(t_ids)
    s_chunks = np.full(len(student.input_ids), -1, dtype=np.int32)
    t_chunks = np.full(teacher.length, -1, dtype=np.int32)
    total = 0
    for s_seg, t_seg in zip(student.segments, teacher.segments):
        if student.text[s_seg.char_start:s_seg.char_end] != teacher.text[t_seg.char_start:t_seg.char_end]:
            counter.drop("segment_text_differs")
            continue
        if not (_spelled(s_seg, s_exact) and _spelled(t_seg, t_exact)):
            counter.drop("segment_not_spelled")
            continue
        s0, s1 = _tokens_inside(s_off, s_seg.byte_start, s_seg.byte_end, student.length)
        t0, t1 = _tokens_inside(t_off, t_seg.byte_start, t_seg.byte_end, t_limit)
        if (s1 == student.length and s_off[s1] < s_seg.byte_end) or (t1 == t_limit and t_off[t1] < t_seg.byte_end):
            counter.drop("segment_cut")
        a, b, n = align_spans(s_off[s0:s1 + 1] - s_seg.byte_start, t_off[t0:t1 + 1] - t_seg.byte_start)
        a, b, n, mixed = _drop_mixed_atomic(a, b, s_atomic[s0:s1], t_atomic[t0:t1], n)
        if mixed:
            counter.drop("chunk_atomic_mismatch", mixed)
        s_chunks[s0:s1] = np.where(a >= 0, a + total, -1)
        t_chunks[t0:t1] = np.where(b >= 0, b + total, -1)
        total += n
    in_chunk = np.flatnonzero(t_chunks >= 0)
    teacher_length = int(in_chunk[-1]) + 1 if len(in_chunk) else t_limit
    return ChunkAlignment(s_chunks, t_chunks[:teacher_length], total, teacher_length)


def _spelled(segment: Segment, exact: tuple[int, bool]) -> bool:
    """Whether the tokens spell the segment's bytes (or the part of it before a truncation)."""
    n, whole = exact
    return whole or segment.byte_end <= n


def aligned_pairs(
    student: EncodedChat,
    teacher: EncodedChat,
    *,
    roles: tuple[str, ...] = ("assistant",),
    teacher_max_length: int | None = None,
    counter: DropCounter | None = None,
) -> AlignedPairs:
    """Position pairs between two formats of one conversation in the same tokenizer (pipeline B, docs/method.md §11.3).

    For every message whose role is in ``roles`` and whose content is non-empty, the content tokens of
    the two sides are matched by a diff of their ids; tokens left without a partner are counted as
    ``pair_unmatched_token`` (tokens that only a length limit took from the other side are not).
    Pairs beyond the student's length or ``teacher_max_length`` are dropped (docs/method.md §11.3 step 4 and the
    aligned collator).
    """
    counter = counter if counter is not None else DropCounter()
    t_limit = teacher.length if teacher_max_length is None else min(teacher.length, teacher_max_length)
    student_pos: list[int] = []
    teacher_pos: list[int] = []
    for s_seg, t_seg in zip(student.segments, teacher.segments):
        if s_seg.role not in roles or s_seg.char_start == s_seg.char_end:
            continue
        s_ids = student.input_ids[s_seg.token_start:s_seg.token_end]
        t_ids = teacher.input_ids[t_seg.token_start:min(t_seg.token_end, t_limit)]
        if s_ids == t_ids:
            blocks = [(0, 0, len(s_ids))]
        else:
            blocks = difflib.SequenceMatcher(None, s_ids, t_ids, autojunk=False).get_matching_blocks()
        matched = sum(size for _, _, size in blocks)
        last_s = max((i + size for i, _, size in blocks if size), default=0)
        last_t = max((j + size for _, j, size in blocks if size), default=0)
        # Tokens after the last pair on the side facing a cut may only be missing on the cut side.
        s_cut = s_seg.token_end == student.length < student.untruncated_length
        t_cut = t_seg.token_end > t_limit
        unmatched = (last_s if t_cut else len(s_ids)) + (last_t if s_cut else len(t_ids)) - 2 * matched
        if unmatched:
            counter.drop("pair_unmatched_token", unmatched)
        for i, j, size in blocks:
            student_pos.extend(range(s_seg.token_start + i, s_seg.token_start + i + size))
            teacher_pos.extend(range(t_seg.token_start + j, t_seg.token_start + j + size))
    teacher_length = teacher_pos[-1] + 1 if teacher_pos else t_limit
    return AlignedPairs(
        np.asarray(student_pos, dtype=np.int32), np.asarray(teacher_pos, dtype=np.int32), teacher_length
    )


def verify_aligned_pairs(student_ids: list[int] | np.ndarray, teacher_ids: list[int] | np.ndarray,
                         student_pos: np.ndarray, teacher_pos: np.ndarray) -> int:
    """Number of pairs whose two positions hold different ids or lie outside their sequence (0 = all good)."""
    s_ids, t_ids = np.asarray(student_ids), np.asarray(teacher_ids)
    s_pos, t_pos = np.asarray(student_pos, dtype=np.int64), np.asarray(teacher_pos, dtype=np.int64)
    if s_pos.shape != t_pos.shape:
        raise ValueError(f"verify_aligned_pairs: {s_pos.shape} student positions but {t_pos.shape} teacher positions")
    in_range = (s_pos >= 0) & (s_pos < len(s_ids)) & (t_pos >= 0) & (t_pos < len(t_ids))
    equal = np.zeros_like(in_range)
    equal[in_range] = s_ids[s_pos[in_range]] == t_ids[t_pos[in_range]]
    return int((~equal).sum())
