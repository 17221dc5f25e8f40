"""A small pipeline-A dataset for trainer tests: Qwen3 student tokens, a byte-level teacher.

The teacher side tokenizes the same text into single bytes (ids 0..255 of a tiny LLaDA2 teacher), so the
smallest spans with a common byte boundary are exactly the student tokens: every student token is one
chunk, holding its bytes on the teacher side. A chunk cut by the teacher length limit is dropped on
both sides. This exercises the trainer's data contract without the full preprocessing pipeline.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np


def _byte_decoder() -> dict[str, int]:
    # GPT-2 / Qwen byte-level BPE alphabet: printable bytes map to themselves, the rest to U+0100...
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def build_pipeline_a_dataset(corpus_dir: str | Path, tokenizer_dir: str | Path, out_dir: str | Path, *,
                             teacher_len: int, teacher_pad: int = 1200, max_samples: int = 200) -> Path:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    special = set(tok.all_special_ids) | set(tok.added_tokens_decoder)
    decoder = _byte_decoder()
    splits = {}
    corpus = datasets.load_from_disk(str(corpus_dir))
    for split in ("train", "heldout"):
        rows = {k: [] for k in ("input_ids", "labels", "student_chunk_ids", "teacher_input_ids",
                                "teacher_attention_mask", "teacher_chunk_ids")}
        ds = corpus[split].select(range(min(max_samples, len(corpus[split]))))
        for sample in ds:
            ids = list(sample["input_ids"])
            s_chunks = np.full(len(ids), -1, dtype=np.int32)
            t_ids, t_chunks = [], []
            for pos, tid in enumerate(ids):
                if tid in special or sample["labels"][pos] == -100:
                    continue
                data = [decoder[ch] for ch in tok.convert_ids_to_tokens(tid)]
                if len(t_ids) + len(data) > teacher_len:
                    break  # this chunk and every later one would be cut: dropped on both sides
                chunk = int(s_chunks.max()) + 1
                s_chunks[pos] = chunk
                t_ids += data
                t_chunks += [chunk] * len(data)
            pad = teacher_len - len(t_ids)
            rows["input_ids"].append(ids)
            rows["labels"].append(list(sample["labels"]))
            rows["student_chunk_ids"].append(s_chunks.tolist())
            rows["teacher_input_ids"].append(t_ids + [teacher_pad] * pad)
            rows["teacher_attention_mask"].append([1] * len(t_ids) + [0] * pad)
            rows["teacher_chunk_ids"].append(t_chunks + [-1] * pad)
        splits[split] = datasets.Dataset.from_dict(rows)
    datasets.DatasetDict(splits).save_to_disk(str(out_dir))
    return Path(out_dir)
