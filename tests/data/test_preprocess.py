"""Offline preprocessing: drop reasons, the pipeline A/B data contract, determinism, resume, input formats, CLI."""

from __future__ import annotations

import hashlib
import json
import sysconfig
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tide_ds.data import preprocess as pp
from tide_ds.data.alignment import TokenBytes, verify_aligned_pairs
from tide_ds.data.collate import PIPELINE_COLUMNS
from tide_ds.data.corpus import split_of
from tide_ds.data.instruct_corpus import build_instruct_jsonl
from tide_ds.data.loader import collate
from tide_ds.data.more_tokenizers import train_sentencepiece_tokenizer
from tide_ds.data.preprocess import PreprocessConfig, preprocess
from tide_ds.data.tokenizers import ensure_qwen3_tokenizer, load_tokenizer
from tide_ds.trainer.objectives import CHUNK_COLUMNS

STDLIB = Path(sysconfig.get_paths()["stdlib"])
L, L_T, K = 256, 512, 32
HELDOUT = 0.2
QWEN3_EOS, QWEN3_PAD = 151645, 151643
LIMIT, SHARD = 240, 64  # 4 shards


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same path as the other data tests, so the session builds the tokenizer once."""
    return ensure_qwen3_tokenizer(tmp_path_factory.getbasetemp() / "tide_ds_cache")


@pytest.fixture(scope="session")
def spm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same corpus, size and path as in test_more_tokenizers.py, so it is trained once."""
    names = ["textwrap.py", "string.py", "json/decoder.py", "json/encoder.py", "locale.py", "encodings/cp1252.py"]
    return train_sentencepiece_tokenizer([STDLIB / n for n in names], tmp_path_factory.getbasetemp() / "spm_teacher",
                                         vocab_size=1500)


_ENCODERS: dict[tuple, object] = {}
_build_encoder = PreprocessConfig.encoder


def _cached_encoder(cfg: PreprocessConfig):
    key = (cfg.pipeline, str(cfg.student_tokenizer), str(cfg.teacher_tokenizer), cfg.seq_len, cfg.teacher_seq_len,
           cfg.block_size, cfg.student_format, cfg.teacher_format)
    if key not in _ENCODERS:
        _ENCODERS[key] = _build_encoder(cfg)
    return _ENCODERS[key]


@pytest.fixture(scope="module", autouse=True)
def shared_encoders():
    """Build each ContractEncoder once (loading tokenizers and byte tables takes seconds per run)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PreprocessConfig, "encoder", _cached_encoder)
        yield
    _ENCODERS.clear()


def _config(pipeline: str, input: Path, out: Path, qwen3_dir: Path, teacher: Path, **kw) -> PreprocessConfig:
    options = {"seq_len": L, "teacher_seq_len": L_T, "block_size": K, "heldout_fraction": HELDOUT, "shard_size": SHARD}
    return PreprocessConfig(pipeline=pipeline, input=input, student_tokenizer=qwen3_dir, teacher_tokenizer=teacher,
                            out=out, **{**options, **kw})


def _tree_digest(path: Path) -> dict[str, str]:
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(path.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def instruct_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path, _ = build_instruct_jsonl(tmp_path_factory.mktemp("instruct") / "instruct.jsonl", max_files=30,
                                   heldout_fraction=HELDOUT)
    return path


@pytest.fixture(scope="module")
def dataset_a(instruct_jsonl: Path, qwen3_dir: Path, spm_dir: Path, tmp_path_factory) -> pp.PreprocessResult:
    out = tmp_path_factory.mktemp("a") / "data"
    return preprocess(_config("A", instruct_jsonl, out, qwen3_dir, spm_dir, limit=LIMIT))


# --- rows kept and dropped ---


def _source(split: str, i: int = 0) -> str:
    """A source name whose rows fall into ``split``."""
    return next(f"src-{split}-{n}" for n in range(i, 10_000) if split_of(f"src-{split}-{n}", heldout_fraction=HELDOUT) == split)


def _chat(prompt: str, response: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], **extra}


def _bad_rows_file(path: Path) -> tuple[Path, dict[str, int], dict[str, int]]:
    """A JSONL file of good and bad rows; returns it, the expected drop counts and kept counts per split."""
    train, heldout = _source("train"), _source("heldout")
    good = [
        _chat("Say hi.", "hi", source=train),
        _chat("Write code.", "def f():\n    return 1", source=heldout),
        {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "Q"},
                      {"role": "assistant", "content": "A"}, {"role": "user", "content": "Again?"},
                      {"role": "assistant", "content": "Yes, 中文 🙂."}], "source": train},
        _chat("Long answer:", "print(1)\n" * 200, source=train),  # kept, truncated
    ]
    bad = {
        "no_messages": [{"messages": []}, {"text": "no messages key"}, {"messages": "not a list"}],
        "bad_message": [{"messages": ["hello"]}],
        "missing_role": [{"messages": [{"content": "x"}, {"role": "assistant", "content": "y"}]}],
        "unknown_role": [{"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}],
        "missing_content": [{"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "y"}]}],
        "empty_content": [_chat("   ", "y"), _chat("x", "")],
        "last_not_assistant": [{"messages": [{"role": "user", "content": "x"}]}],
        "control_token_in_content": [_chat("x", "the end<|im_end|>"), _chat("<role>x", "y")],  # student / teacher
        "prompt_too_long": [_chat("word " * 400, "y")],
        "teacher_prompt_too_long": [_chat("我们用中文写一段很长的说明。" * 14, "好")],  # 1 token/char vs 3 bytes
    }
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in good[1:]]
    lines += [json.dumps(r, ensure_ascii=False).encode() for rows in bad.values() for r in rows]
    raw = {
        "blank_line": [b"", b"   "],
        "bad_json": [b'{"messages": [', b"not json"],
        "bad_row": [b"[1, 2]", b'"a string"'],
        "invalid_utf8": [b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
                         json.dumps(_chat("x", "lone \ud800 surrogate")).encode()],
    }
    lines += [line for rows in raw.values() for line in rows]
    rng = np.random.default_rng(0)
    lines = [lines[i] for i in rng.permutation(len(lines))] + [json.dumps(good[0]).encode()]
    path.write_bytes(b"\n".join(lines))  # no newline after the last line
    expected = {reason: len(rows) for reason, rows in {**bad, **raw}.items()}
    return path, expected, {"train": 3, "heldout": 1}


def test_every_row_is_kept_or_counted(tmp_path: Path, qwen3_dir: Path, spm_dir: Path) -> None:
    path, expected, kept = _bad_rows_file(tmp_path / "rows.jsonl")
    result = preprocess(_config("A", path, tmp_path / "out", qwen3_dir, spm_dir, shard_size=7))
    rows = result.summary["rows"]
    assert rows["dropped_by_reason"] == expected
    assert rows["kept_by_split"] == kept
    assert rows["read"] == len(path.read_bytes().split(b"\n")) == rows["kept"] + rows["dropped"] == 26
    assert rows["student_truncated"] == 1
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == result.summary
    splits = datasets.load_from_disk(str(tmp_path / "out"))
    assert {s: len(d) for s, d in splits.items()} == kept
    assert all(d.column_names == list(PIPELINE_COLUMNS["A"]) for d in splits.values())
    assert not (tmp_path / ".out.work").exists()  # the work directory is removed after publishing


# --- the data contract ---


def _check_student(row: dict) -> int:
    """Check the student columns; returns the end of the labelled run (where padding starts)."""
    ids, labels = row["input_ids"], row["labels"]
    assert ids.shape == labels.shape == (L,)
    labelled = np.flatnonzero(labels != -100)
    first, end = labelled[0], labelled[-1] + 1
    assert np.all(labels[first:end] == ids[first:end])  # one labelled run: response, end of turn, EOS padding
    # "<|im_end|>\n", then EOS padding if the turn does not end on a block boundary; a truncated row: no EOS
    assert end % K == 0 and (QWEN3_EOS in ids[end - 2:end] or end == L)
    assert np.all(ids[end:] == QWEN3_PAD) and np.all(labels[:first] == -100)
    return end


def _chunk_runs(chunks: np.ndarray) -> list[np.ndarray]:
    n = chunks.max() + 1
    assert np.array_equal(np.unique(chunks[chunks >= 0]), np.arange(n))  # ids 0..C-1, every one used
    assert np.all(np.diff(chunks[chunks >= 0]) >= 0)  # increasing along the sequence
    runs = [np.flatnonzero(chunks == c) for c in range(n)]
    assert all(len(r) and np.all(np.diff(r) == 1) for r in runs)  # contiguous, >= 1 token
    return runs


def test_pipeline_a_contract(dataset_a: pp.PreprocessResult, qwen3_dir: Path, spm_dir: Path) -> None:
    student, teacher = TokenBytes.from_tokenizer(load_tokenizer(qwen3_dir)), TokenBytes.from_tokenizer(load_tokenizer(spm_dir))
    teacher_pad = load_tokenizer(spm_dir).pad_token_id
    splits = datasets.load_from_disk(str(dataset_a.out)).with_format("numpy")
    assert {s: len(d) for s, d in splits.items()} == dataset_a.summary["rows"]["kept_by_split"]
    assert set(CHUNK_COLUMNS) <= set(splits["train"].column_names)
    assert {f.feature.dtype for f in splits["train"].features.values()} == {"int32"}
    chunks = 0
    for split in splits.values():
        for row in split:
            end = _check_student(row)
            s_chunks, t_chunks, t_ids, mask = (row[c] for c in ("student_chunk_ids", "teacher_chunk_ids",
                                                                 "teacher_input_ids", "teacher_attention_mask"))
            assert s_chunks.shape == (L,) and t_chunks.shape == t_ids.shape == mask.shape == (L_T,)
            n_real = int(mask.sum())
            assert np.all(mask[:n_real] == 1) and np.all(mask[n_real:] == 0) and np.all(t_ids[n_real:] == teacher_pad)
            assert np.all(t_chunks[n_real:] == -1) and np.all(s_chunks[end:] == -1)
            s_runs, t_runs = _chunk_runs(s_chunks), _chunk_runs(t_chunks)
            assert len(s_runs) == len(t_runs) > 0 and t_runs[-1][-1] == n_real - 1  # teacher cut after its last chunk
            for s_pos, t_pos in zip(s_runs, t_runs):  # the same bytes on both sides
                assert student.spelled(row["input_ids"][s_pos]) == teacher.spelled(t_ids[t_pos])
            chunks += len(s_runs)
    stats = dataset_a.summary["chunks"]
    assert chunks == stats["total"] and 0.5 < stats["response_bytes_covered"] <= 1.0
    assert dataset_a.summary["rows"]["student_truncated"] > 0  # truncated rows were checked too
    batch = collate([splits["train"][i] for i in range(3)])  # what the trainer stacks
    assert batch["teacher_chunk_ids"].shape == (3, L_T) and batch["student_chunk_ids"].shape == (3, L)


def test_pipeline_b_pairs_hold_the_same_tokens(instruct_jsonl: Path, qwen3_dir: Path, tmp_path: Path) -> None:
    result = preprocess(_config("B", instruct_jsonl, tmp_path / "b", qwen3_dir, qwen3_dir, limit=120))
    assert result.summary["key"]["teacher_format"] == "wedlm"
    splits = datasets.load_from_disk(str(result.out)).with_format("numpy")
    pairs = 0
    for split in splits.values():
        assert split.column_names == list(PIPELINE_COLUMNS["B"])
        for row in split:
            _check_student(row)
            n, s_pos, t_pos = int(row["n_aligned"]), row["align_student"], row["align_teacher"]
            assert n > 0 and np.all(s_pos[n:] == -1) and np.all(t_pos[n:] == -1)
            assert np.all(np.diff(s_pos[:n]) > 0) and np.all(np.diff(t_pos[:n]) > 0)
            assert verify_aligned_pairs(row["input_ids"], row["teacher_input_ids"], s_pos[:n], t_pos[:n]) == 0
            assert np.all(row["labels"][s_pos[:n]] != -100)  # single-turn: pairs lie in the supervised response
            n_real = int(row["teacher_attention_mask"].sum())
            assert n_real % K == 0 and np.all(row["teacher_input_ids"][t_pos[n - 1] + 1:n_real] == QWEN3_EOS)
            pairs += n
    assert pairs == result.summary["pairs"]["total"]
    assert result.summary["pairs"]["response_tokens_covered"] == 1.0  # same tokenizer: every content token pairs


def test_pipeline_b_needs_a_shared_vocabulary(instruct_jsonl: Path, qwen3_dir: Path, spm_dir: Path,
                                              tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="share their regular vocabulary"):
        preprocess(_config("B", instruct_jsonl, tmp_path / "b", qwen3_dir, spm_dir))


# --- determinism, resume, inputs, CLI ---


def test_deterministic_whatever_the_processes(dataset_a: pp.PreprocessResult, instruct_jsonl: Path,
                                             qwen3_dir: Path, spm_dir: Path, tmp_path: Path) -> None:
    again = preprocess(_config("A", instruct_jsonl, tmp_path / "again", qwen3_dir, spm_dir, limit=LIMIT, num_proc=2))
    assert again.shards == 4 and again.shards_processed == 4
    assert _tree_digest(again.out) == _tree_digest(dataset_a.out)  # arrow files, state, summary: same bytes


def test_resume_reuses_finished_shards(dataset_a: pp.PreprocessResult, instruct_jsonl: Path, qwen3_dir: Path,
                                       spm_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    processed: list[int] = []
    process = pp._process_shard
    monkeypatch.setattr(pp, "_process_shard", lambda k: processed.append(k) or process(k))
    out = tmp_path / "resumed"
    first = preprocess(_config("A", instruct_jsonl, out, qwen3_dir, spm_dir, limit=LIMIT, max_shards=1))
    assert first.out is None and not out.exists() and processed == [0]  # "killed" after one shard
    assert (tmp_path / ".resumed.work" / "shard-00000.json").is_file()
    other = preprocess(_config("A", instruct_jsonl, out, qwen3_dir, spm_dir, limit=LIMIT - 1, max_shards=1))
    assert other.shards_reused == 0  # other options: the shards of the first run are not reused
    processed.clear()
    preprocess(_config("A", instruct_jsonl, out, qwen3_dir, spm_dir, limit=LIMIT, max_shards=1))
    done = preprocess(_config("A", instruct_jsonl, out, qwen3_dir, spm_dir, limit=LIMIT))
    assert (done.shards_reused, done.shards_processed) == (1, 3) and processed == [0, 1, 2, 3]
    assert _tree_digest(out) == _tree_digest(dataset_a.out)  # as if never interrupted
    with pytest.raises(ValueError, match="already exists"):
        preprocess(_config("A", instruct_jsonl, out, qwen3_dir, spm_dir, limit=LIMIT))


def test_parquet_and_saved_dataset_inputs(instruct_jsonl: Path, qwen3_dir: Path, tmp_path: Path) -> None:
    rows = [json.loads(line) for line in instruct_jsonl.read_text().splitlines()[:40]]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet", row_group_size=9)
    saved = datasets.DatasetDict({"a": datasets.Dataset.from_list(rows[:25]), "b": datasets.Dataset.from_list(rows[25:])})
    saved.save_to_disk(str(tmp_path / "saved"))
    digests = []
    for name in ("in.jsonl", "in.parquet", "saved"):
        result = preprocess(_config("B", tmp_path / name, tmp_path / f"out-{name}", qwen3_dir, qwen3_dir, shard_size=16))
        assert result.summary["rows"]["read"] == 40
        digests.append({k: v for k, v in _tree_digest(result.out).items() if k.endswith(".arrow")})
    assert digests[0] == digests[1] == digests[2]


def test_cli(instruct_jsonl: Path, qwen3_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["--pipeline", "B", "--input", str(instruct_jsonl), "--student-tokenizer", str(qwen3_dir),
            "--teacher-tokenizer", str(qwen3_dir), "--out", str(tmp_path / "cli"), "--seq-len", str(L),
            "--teacher-seq-len", str(L_T), "--block-size", str(K), "--heldout-fraction", str(HELDOUT),
            "--limit", "30", "--shard-size", "10"]
    assert pp._main(args + ["--max-shards", "1"]) == 3
    assert "rerun the same command to continue" in capsys.readouterr().out
    assert pp._main(args) == 0
    printed = capsys.readouterr().out
    assert "rows: read 30" in printed and "3 shards (1 reused)" in printed
    assert pp._main(args + ["--overwrite", "--limit", "20"]) == 0
    assert json.loads((tmp_path / "cli" / "summary.json").read_text())["rows"]["read"] == 20
    assert pp._main(args[:-4] + ["--seq-len", "100", "--out", str(tmp_path / "other")]) == 2  # a message, no traceback
    assert "error: --seq-len=100 is not a multiple" in capsys.readouterr().err


@pytest.mark.parametrize("data", [b"", b"\n", b"a\nbb\n\nccc", b"a\nbb\n\nccc\n", b"{}"], ids=repr)
def test_jsonl_line_index(tmp_path: Path, data: bytes) -> None:
    (tmp_path / "x.jsonl").write_bytes(data)
    lines = data.split(b"\n")
    lines = lines[:-1] if data.endswith(b"\n") or not data else lines
    for block in (1, 2, 3, 1 << 20):
        part = pp._jsonl_part(tmp_path / "x.jsonl", block=block)
        assert part.num_rows == len(lines)
        assert [data[a:b].rstrip(b"\n") for a, b in zip(part.line_starts[:-1], part.line_starts[1:])] == lines
