"""The instruct world (the TIDE demo): everything a distillation run needs, built offline and cached.

With an empty ``data.dataset`` and ``world.name=instruct``, :func:`tide_ds.worlds.prepare_world` (run by
``launch/run.py`` before training) calls :func:`prepare_instruct_world` for ``distill.pipeline`` (on rank 0,
the others wait). Both forms start from the instruction corpus of the Python standard library (prompt =
signature + docstring, response = body), split by file.

Pipeline A (cross tokenizer, the default):

1. a teacher tokenizer of its own: SentencePiece BPE trained on the corpus text, with LLaDA2's specials;
2. the pipeline-A dataset: Qwen3 student tokens, teacher tokens, alignment chunks (offline preprocessing);
3. a teacher that knows the corpus: a small LLaDA2-format MoE trained as a masked diffusion LM on the
   teacher side of the training split, written in the real LLaDA2 checkpoint layout.

Pipeline B (shared tokenizer):

1. the pipeline-B dataset: Qwen3 student tokens in the Qwen3 chat format, the same text in WeDLM's chat
   format and the student's tokenizer for the teacher, and verified position pairs;
2. a teacher that knows the corpus: a small WeDLM (Qwen3 architecture, the student's tokenizer) trained
   as a BD3LM on the teacher side, written with WeDLM's config and Qwen3 key names.

Each artefact is keyed by its inputs under ``$TIDE_DS_CACHE/demo`` (the directory keeps its first name, so
existing caches stay valid) and built once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from tide_ds.data.tokenizers import default_tokenizer_cache
from tide_ds.utils.files import atomic_path, atomic_write_text, file_lock

logger = logging.getLogger(__name__)

DEMO_FORMAT = 1
#: The worlds' cache directory under $TIDE_DS_CACHE.
CACHE_SUBDIR = "demo"
HELDOUT_FRACTION = 0.02
#: The demo teacher: wider than docs/models.md's tiny test config so that it learns the corpus in minutes.
TEACHER_CONFIG = dict(hidden_size=96, intermediate_size=192, moe_intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32)
#: The pipeline-B demo teacher (dense Qwen3/WeDLM): its LM head over the Qwen3 vocabulary dominates the cost.
TEACHER_CONFIG_B = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)
#: Embedding rows of the pipeline-B teacher: Qwen3's padded vocabulary.
QWEN3_ROWS = 151936


@dataclass(frozen=True)
class InstructWorld:
    dataset: Path
    teacher: Path
    teacher_tokenizer: Path
    teacher_heldout_nll: float
    key: str
    pipeline: str = "A"


def _key(**parts) -> str:
    return hashlib.sha256(json.dumps({"format": DEMO_FORMAT, **parts}, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _text_file(jsonl: Path, out: Path, *, heldout_fraction: float) -> Path:
    """The training split's message texts, for the teacher tokenizer (the held-out files stay unseen)."""
    from tide_ds.data.instruct_corpus import split_of_row

    if out.is_file():
        return out
    with atomic_path(out) as tmp, open(jsonl) as src, open(tmp, "w") as dst:
        for line in src:
            row = json.loads(line)
            if split_of_row(row, heldout_fraction=heldout_fraction) != "train":
                continue
            for message in row["messages"]:
                dst.write(message["content"] + "\n")
    return out


def prepare_instruct_world(
    *, student_tokenizer: Path, seq_len: int, block_size: int, teacher_seq_len: int, max_files: int | None,
    teacher_vocab: int = 4000, teacher_steps: int = 150, seed: int = 0, pipeline: str = "A",
) -> InstructWorld:
    """Build (or reuse) the instruct world of ``pipeline``: corpus, dataset, pretrained teacher (and its tokenizer)."""
    from tide_ds.data.instruct_corpus import ensure_instruct_jsonl

    if pipeline not in ("A", "B"):
        raise ValueError(f"pipeline={pipeline!r} must be A or B")
    root = default_tokenizer_cache() / CACHE_SUBDIR
    root.mkdir(parents=True, exist_ok=True)
    jsonl = ensure_instruct_jsonl(max_files=max_files)
    build = _prepare_a if pipeline == "A" else _prepare_b
    return build(root, jsonl, student_tokenizer=Path(student_tokenizer), seq_len=seq_len, block_size=block_size,
                 teacher_seq_len=teacher_seq_len, teacher_vocab=teacher_vocab, teacher_steps=teacher_steps, seed=seed)


def _ensure_dataset(dataset: Path, pipeline: str, jsonl: Path, student_tokenizer: Path, teacher_tokenizer: Path, *,
                    seq_len: int, teacher_seq_len: int, block_size: int) -> Path:
    """Preprocess the demo corpus for ``pipeline`` into ``dataset`` unless it is there (the caller holds the lock)."""
    from tide_ds.data.preprocess import PreprocessConfig, preprocess

    if not dataset.exists():
        result = preprocess(PreprocessConfig(
            pipeline=pipeline, input=jsonl, student_tokenizer=student_tokenizer, teacher_tokenizer=teacher_tokenizer,
            out=dataset, seq_len=seq_len, teacher_seq_len=teacher_seq_len, block_size=block_size,
            heldout_fraction=HELDOUT_FRACTION, num_proc=2,
        ))
        logger.info("demo dataset: %s", json.dumps(result.summary.get("rows", {})))
    return dataset


def _prepare_a(root: Path, jsonl: Path, *, student_tokenizer: Path, seq_len: int, block_size: int, teacher_seq_len: int,
               teacher_vocab: int, teacher_steps: int, seed: int) -> InstructWorld:
    from tide_ds.data.more_tokenizers import train_sentencepiece_tokenizer
    from tide_ds.data.tokenizers import load_tokenizer, resolve_special_ids
    from tide_ds.worlds.pretrain import pretrain_llada2_teacher

    key = _key(jsonl=jsonl.name, vocab=teacher_vocab, seed=seed)
    with file_lock(root / f".{key}.lock"):
        text = _text_file(jsonl, root / f"text-{jsonl.stem}.txt", heldout_fraction=HELDOUT_FRACTION)
        teacher_tok = train_sentencepiece_tokenizer([text], root / f"teacher-tokenizer-{key}", vocab_size=teacher_vocab, seed=seed)
        data_key = _key(base=key, student=str(student_tokenizer), seq_len=seq_len, teacher_seq_len=teacher_seq_len,
                        block=block_size)
        dataset = _ensure_dataset(root / f"pipeline-a-{data_key}", "A", jsonl, student_tokenizer, teacher_tok,
                                  seq_len=seq_len, teacher_seq_len=teacher_seq_len, block_size=block_size)
        teacher = root / f"teacher-{_key(data=data_key, steps=teacher_steps, config=TEACHER_CONFIG)}"
        if not teacher.exists():
            special = resolve_special_ids(load_tokenizer(teacher_tok))
            pretrain_llada2_teacher(
                dataset, teacher, vocab_size=-(-special.vocab_size // 64) * 64, mask_token_id=special.mask_id,
                eos_token_id=special.eos_id, steps=teacher_steps, batch_size=16, lr=3e-3, seed=seed,
                config=TEACHER_CONFIG, tokenizer_dir=teacher_tok,
            )
        nll = json.loads((teacher / "tide_ds_pretrain.json").read_text())["heldout_nll"]
    return InstructWorld(dataset=dataset, teacher=teacher, teacher_tokenizer=teacher_tok, teacher_heldout_nll=nll,
                     key=data_key, pipeline="A")


def _prepare_b(root: Path, jsonl: Path, *, student_tokenizer: Path, seq_len: int, block_size: int, teacher_seq_len: int,
               teacher_vocab: int, teacher_steps: int, seed: int) -> InstructWorld:
    from tide_ds.data.tokenizers import load_tokenizer, resolve_special_ids
    from tide_ds.worlds.pretrain import pretrain_wedlm_teacher

    data_key = _key(pipeline="B", jsonl=jsonl.name, student=str(student_tokenizer), seq_len=seq_len,
                    teacher_seq_len=teacher_seq_len, block=block_size, seed=seed)
    with file_lock(root / f".{data_key}.lock"):
        dataset = _ensure_dataset(root / f"pipeline-b-{data_key}", "B", jsonl, student_tokenizer, student_tokenizer,
                                  seq_len=seq_len, teacher_seq_len=teacher_seq_len, block_size=block_size)
        teacher = root / f"teacher-b-{_key(data=data_key, steps=teacher_steps, config=TEACHER_CONFIG_B)}"
        if not teacher.exists():
            special = resolve_special_ids(load_tokenizer(student_tokenizer))
            pretrain_wedlm_teacher(
                dataset, teacher, vocab_size=max(QWEN3_ROWS, special.vocab_size), mask_token_id=special.mask_id,
                eos_token_id=special.eos_id, pad_token_id=special.pad_id, block_size=block_size,
                steps=teacher_steps, batch_size=16, lr=3e-3, seed=seed, config=TEACHER_CONFIG_B,
                tokenizer_dir=student_tokenizer,
            )
        nll = json.loads((teacher / "tide_ds_pretrain.json").read_text())["heldout_nll"]
    return InstructWorld(dataset=dataset, teacher=teacher, teacher_tokenizer=student_tokenizer, teacher_heldout_nll=nll,
                     key=data_key, pipeline="B")


def results_file() -> Path:
    return default_tokenizer_cache() / CACHE_SUBDIR / "results.json"


def record_result(data_key: str, preset: str, nll: float) -> dict:
    """Remember the held-out NLL of a run in this world per (run key, preset), so later runs can compare."""
    path = results_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(path.read_text()) if path.is_file() else {}
    results.setdefault(data_key, {})[preset] = nll
    atomic_write_text(path, json.dumps(results, indent=1, sort_keys=True))
    return results[data_key]
