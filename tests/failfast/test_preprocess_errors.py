"""Item 8 of issue 16: preprocessing errors are messages with the drop counts, not tracebacks; consistent counts."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from tide_ds.data import preprocess as pp
from tide_ds.data.tokenizers import ensure_qwen3_tokenizer, file_lock


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_qwen3_tokenizer(tmp_path_factory.getbasetemp() / "tide_ds_cache")


def _chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"question {i}"},
                         {"role": "assistant", "content": f"answer number {i} " * (1 + i % 3)}]}


def _cli(qwen3: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--pipeline", "B", "--input", str(data), "--student-tokenizer", str(qwen3), "--teacher-tokenizer",
            str(qwen3), "--out", str(out), "--seq-len", "64", "--teacher-seq-len", "64", "--block-size", "16", *extra]


def test_all_bad_rows_give_one_line_with_the_drop_reasons(qwen3_dir: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('not json\n{"messages": []}\n[1]\n{"text": "x"}\nnot json either\n')
    assert pp._main(_cli(qwen3_dir, data, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert err == ("python -m tide_ds.data.preprocess: error: no row was kept (5 rows read, 0 kept, 5 dropped "
                   "(bad_json=2, no_messages=2, bad_row=1)), so the train split would be empty; fix the input rows "
                   "(the drop reasons say what is wrong with them) or the length options (--seq-len, "
                   "--teacher-seq-len)\n")
    assert not (tmp_path / "out").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".lock")]  # no lock file left


def test_a_small_dataset_says_which_fraction_to_use(qwen3_dir: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "small.jsonl"
    data.write_text("".join(json.dumps(_chat(i)) + "\n" for i in range(20)))
    assert pp._main(_cli(qwen3_dir, data, tmp_path / "out")) == 2  # default --heldout-fraction=0.02
    err = capsys.readouterr().err
    assert "the heldout split would be empty (20 rows read, 20 kept): --heldout-fraction=0.02 of 20 rows is " \
           "0.40 expected rows; raise --heldout-fraction to about 0.1 or give more input rows" in err
    assert "Traceback" not in err
    assert pp._main(_cli(qwen3_dir, data, tmp_path / "out", "--heldout-fraction", "0.3")) == 0
    summary = json.loads((tmp_path / "out" / pp.SUMMARY_FILE).read_text())
    assert summary["rows"]["teacher_truncated"] == 0
    # pipeline B: the teacher's text tokens, not its EOS block padding: never more than before truncation
    tokens = summary["tokens"]
    assert 0 < tokens["teacher_tokens"] <= tokens["teacher_tokens_untruncated"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".lock")]


def test_file_lock_excludes_and_leaves_no_file(tmp_path: Path) -> None:
    lock, inside, overlaps = tmp_path / ".x.lock", [], []

    def work(i: int) -> None:
        for _ in range(20):
            with file_lock(lock):
                if inside:
                    overlaps.append(i)
                inside.append(i)
                time.sleep(0.001)
                inside.pop()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == [] and not lock.exists()


@pytest.mark.parametrize("keep", [0.5, 0.02])  # cut inside the tensors, and inside the header
def test_a_truncated_safetensors_file_is_named(tmp_path: Path, keep: float) -> None:
    import torch

    from tide_ds.models.hf_weights import list_checkpoint_keys, load_safetensors_checkpoint, save_safetensors_checkpoint

    save_safetensors_checkpoint({"a": torch.ones(64, 64), "b": torch.zeros(8)}, tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match=rf"{path} \(\d+ bytes\) is not a readable safetensors file: .*truncated"):
        load_safetensors_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=rf"{path} \(\d+ bytes\) is not a readable safetensors file"):
        list_checkpoint_keys(tmp_path)


def test_generate_says_why_a_completion_is_empty() -> None:
    from tide_ds.generate import Completion, why_empty

    assert why_empty(Completion(text="x = 1", token_ids=[5], finished=True), 16) is None
    assert why_empty(Completion(text="", token_ids=[], finished=True), 16).startswith(
        "0 tokens: the model's first token was a stop token")
    assert why_empty(Completion(text=" ", token_ids=[7, 8], finished=False), 16) == (
        "2 token(s), none of them text (special tokens only, and no stop within --max-new-tokens=16)")
