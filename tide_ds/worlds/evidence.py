"""The evidence world: a world in which distillation can matter, built and cached by the project's own code.

The demo worlds (:mod:`tide_ds.worlds.instruct`) give the teacher the student's data and about its compute,
and the student the 151,936-entry Qwen3 vocabulary, which dominates CPU training. Here:

* the corpus is the same instruction corpus of the standard library (prompt = signature + docstring,
  response = body), split by file (:func:`tide_ds.data.instruct_corpus.split_of_row`);
* the **student** has a small SentencePiece BPE tokenizer of its own (``student_vocab`` pieces, trained on the
  training split's messages, with Qwen3's chat specials so the Qwen3 chat format renders), and sees either
  a ``limited_fraction`` of the training samples (setting ``limited``) or all of them (``full``);
* pipeline A's **teacher** has a different SentencePiece tokenizer (``teacher_vocab`` pieces, trained on the
  training files' source code, LLaDA2's specials) and is a LLaDA2-layout MoE; pipeline B's teacher is a
  WeDLM-layout BD3LM with the student's tokenizer. Both are larger than the student and pretrained for
  ``teacher_steps`` on much more text than any student sees: every training sample's teacher side plus the
  source code of every training file, cut into windows (held-out files are never seen by anyone);
* the teachers are measured on the held-out responses in **bits per byte** (:func:`response_elbo`:
  the masked-diffusion ELBO with only response positions masked, the prompt visible, as the students are
  evaluated), so teacher and student compare across tokenizers.
* the **students' starting point** (``student_init_steps`` > 0): the student of ``student_recipe`` trained with CE
  alone on the limited training samples by ``launch/run.py`` (:func:`ensure_student_init`) and exported as a Hugging
  Face directory. Every evidence run starts from it, as the paper's students all start from one pretrained
  checkpoint (Qwen3-0.6B), so the runs spend their steps on what the teacher adds, not on leaving the
  plateau a fresh masked-diffusion student sits on while it learns to read its context (on this corpus
  some 12,000-25,000 samples, at a different step for every seed). It trains beside the teachers.

Everything is cached under ``<root>/world-<key>`` (``key`` hashes :class:`EvidenceSpec`), each teacher under
``<root>/teachers/<pipeline>-<key>`` (:meth:`EvidenceSpec.teacher_key`: what decides that teacher only, so that a
change to one teacher does not retrain the other), the students' starting point under
``<root>/students/init-<key>`` (:meth:`EvidenceSpec.student_init_key`); a build that died half-way starts over,
reusing the teachers and starting point that were complete. ``python -m tide_ds.experiments.evidence --world
evidence`` builds and uses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import random
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

WORLD_FORMAT = 1
SETTINGS = ("limited", "full")
#: The fields of :class:`EvidenceSpec` that decide only the students' starting point (not the teachers).
STUDENT_INIT_FIELDS = ("student_recipe", "student_init_steps", "student_init_batch", "student_init_lr")


@dataclass(frozen=True)
class EvidenceSpec:
    """Everything that decides the world (its cache key)."""

    seed: int = 0
    max_files: int = 0  # 0: the whole standard library (tests use a few files)
    heldout_fraction: float = 0.02
    max_heldout: int = 128  # held-out samples kept (the first ones, in corpus order)
    limited_fraction: float = 0.15
    student_vocab: int = 512
    teacher_vocab: int = 3000
    seq_len: int = 160
    teacher_seq_len: int = 192  # a multiple of block_size (pipeline B pads the teacher to whole blocks)
    block_size: int = 32
    source_windows: int = 0  # cap on the source-code windows of the teachers' pretraining (0: all)
    teacher_steps: int = 2800  # pipeline A's teacher
    teacher_steps_b: int = 4000  # pipeline B's: each step reads [x_0 ; x_t], twice the positions
    teacher_batch: int = 16
    teacher_lr: float = 5e-3
    eval_draws: int = 4  # noise draws of the teachers' held-out ELBO
    teacher_config_a: dict = field(default_factory=lambda: dict(
        hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, num_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1))
    teacher_config_b: dict = field(default_factory=lambda: dict(
        hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, tie_word_embeddings=True))
    # The students' starting point (:func:`ensure_student_init`): the recipe's student trained with CE alone on the
    # limited training samples, by launch/run.py, then exported; 0 steps: students start from random weights.
    student_recipe: str = "launch/recipes/evidence.yaml"
    student_init_steps: int = 1000
    student_init_batch: int = 32
    student_init_lr: float = 3e-3

    def __post_init__(self) -> None:
        if not 0.0 < self.limited_fraction <= 1.0:
            raise ValueError(f"limited_fraction={self.limited_fraction!r} must lie in (0, 1]")
        if self.teacher_seq_len % self.block_size or self.seq_len % self.block_size:
            raise ValueError(f"seq_len={self.seq_len} and teacher_seq_len={self.teacher_seq_len} must be multiples "
                             f"of block_size={self.block_size}")
        if self.student_init_steps < 0 or self.student_init_batch < 1 or self.student_init_lr <= 0:
            raise ValueError(f"student_init_steps={self.student_init_steps}, student_init_batch={self.student_init_batch}, "
                             f"student_init_lr={self.student_init_lr}: steps must be >= 0, the batch >= 1, the lr > 0")
        if self.student_vocab == self.teacher_vocab:
            raise ValueError(f"student_vocab == teacher_vocab == {self.student_vocab}: pipeline A needs two "
                             "different tokenizers; choose different sizes")

    def key(self) -> str:
        """The world's cache key: every field, and the student recipe's settings when the world trains the students'
        starting point (a change to the student's width retrains it)."""
        from tide_ds.config import load_recipe

        fields = asdict(self)
        if self.student_init_steps:  # the recipe's settings, not its comments
            fields["student_recipe_settings"] = load_recipe(self.student_recipe)
        data = json.dumps({"format": WORLD_FORMAT, **fields}, sort_keys=True)
        return hashlib.sha256(data.encode()).hexdigest()[:12]

    def student_init_key(self) -> str:
        """What decides the students' starting point: the student data (corpus, split, tokenizers, windows, limited
        fraction), the student recipe's settings and the init's steps, batch and lr; not the teachers'."""
        from tide_ds.config import load_recipe

        teacher_only = ("teacher_steps", "teacher_steps_b", "teacher_config_a", "teacher_config_b", "teacher_batch",
                        "teacher_lr", "source_windows", "eval_draws")
        fields = {k: v for k, v in asdict(self).items() if k not in teacher_only}
        data = json.dumps({"format": WORLD_FORMAT, "student_init": True, **fields,
                           "student_recipe_settings": load_recipe(self.student_recipe)}, sort_keys=True)
        return hashlib.sha256(data.encode()).hexdigest()[:12]

    def teacher_key(self, pipeline: str) -> str:
        """What decides pipeline ``pipeline``'s teacher: everything but the other teacher's steps and config, the
        evaluation's noise draws and the students' starting point. Changing pipeline B's teacher does not retrain
        pipeline A's, and back."""
        other = {"A": ("teacher_steps_b", "teacher_config_b"), "B": ("teacher_steps", "teacher_config_a")}[pipeline]
        fields = {k: v for k, v in asdict(self).items() if k not in (*other, "eval_draws", *STUDENT_INIT_FIELDS)}
        data = json.dumps({"format": WORLD_FORMAT, "pipeline": pipeline, **fields}, sort_keys=True)
        return hashlib.sha256(data.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class EvidenceWorld:
    root: Path
    student_tokenizer: Path
    teacher_tokenizer: Path  # pipeline A's
    datasets: dict  # "A/limited", "A/full", "B/limited", "B/full" -> dataset directory
    teacher_a: Path
    teacher_b: Path
    student_vocab_size: int  # entries of the student's tokenizer (specials included)
    teacher: dict  # per pipeline: heldout nats, tokens, bytes, bits_per_byte, nll_per_token, pretraining record
    heldout: dict  # the students' held-out responses: maskable tokens, bytes, samples
    sizes: dict  # training samples per setting, teacher pretraining rows
    student_init: dict = field(default_factory=dict)  # path (Hugging Face directory), steps, samples, held-out NLL

    @property
    def student_init_path(self) -> Path | None:
        return Path(self.student_init["path"]) if self.student_init else None

    def dataset(self, pipeline: str, setting: str) -> Path:
        return Path(self.datasets[f"{pipeline}/{setting}"])

    def to_json(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict) -> EvidenceWorld:
        paths = ("root", "student_tokenizer", "teacher_tokenizer", "teacher_a", "teacher_b")
        return cls(**{k: Path(v) if k in paths else v for k, v in data.items()})


# --- arithmetic ---


def bits_per_byte(total_nats: float, n_bytes: int) -> float:
    """Total negative log-likelihood (nats) of a text over its UTF-8 byte count, in bits per byte."""
    if n_bytes <= 0:
        raise ValueError(f"bits_per_byte of {n_bytes} bytes: the text must be non-empty")
    return total_nats / (math.log(2) * n_bytes)


def response_bytes(tokenizer: Any, ids_per_sample: list[list[int]]) -> int:
    """UTF-8 bytes of the text the response tokens spell (special tokens, such as the end of turn, spell none)."""
    return sum(len(tokenizer.decode(ids, skip_special_tokens=True).encode("utf-8")) for ids in ids_per_sample)


def student_heldout_units(dataset_dir: str | Path, tokenizer_dir: str | Path) -> dict:
    """The students' held-out responses: maskable tokens (``labels >= 0``), their bytes, samples. A student's
    bits per byte is ``nll_per_token * tokens / (ln 2 * bytes)``."""
    import datasets
    import numpy as np

    from tide_ds.data.tokenizers import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    split = datasets.load_from_disk(str(dataset_dir))["heldout"]
    ids = [[int(x) for x in np.asarray(lab) if x >= 0] for lab in split["labels"]]
    return {"tokens": sum(map(len, ids)), "bytes": response_bytes(tok, ids), "samples": len(ids)}


def _response_positions(row: dict, pipeline: str) -> list[int]:
    """Teacher positions of the response: A, the teacher tokens of the alignment chunks that hold the student's
    response tokens (``labels >= 0``; chunks cover the prompt too); B, the aligned positions of the student's
    response tokens."""
    if pipeline == "A":
        chunks = {int(c) for c, lab in zip(row["student_chunk_ids"], row["labels"]) if c >= 0 and lab >= 0}
        return [i for i, c in enumerate(row["teacher_chunk_ids"]) if int(c) in chunks]
    return [int(p) for p in row["align_teacher"][: int(row["n_aligned"])]]


def response_elbo(model: Any, split: Any, *, pipeline: str, mask_id: int, forward: Any, seed: int, draws: int,
                  batch_size: int = 16) -> tuple[float, int, list[list[int]]]:
    """The teacher's masked-diffusion ELBO on the responses of ``split``: only response positions are masked
    (each with probability t), the prompt stays visible, as in the students' evaluation; averaged over
    ``draws`` noise draws (fixed seeds). Returns (total nats, response tokens, the response ids per sample)."""
    import torch

    from tide_ds.diffusion.generators import make_generator
    from tide_ds.diffusion.timesteps import sample_timesteps

    model.eval()
    total, count, ids_out = 0.0, 0, []
    with torch.no_grad():
        for start in range(0, len(split), batch_size):
            rows = split[start: start + batch_size]
            ids = torch.as_tensor(rows["teacher_input_ids"], dtype=torch.long)
            att = torch.as_tensor(rows["teacher_attention_mask"], dtype=torch.long)
            resp = torch.zeros_like(ids, dtype=torch.bool)
            for b in range(ids.shape[0]):
                row = {k: rows[k][b] for k in rows}
                pos = _response_positions(row, pipeline)
                resp[b, pos] = True
                ids_out.append(ids[b, pos].tolist())
            count += int(resp.sum())
            for d in range(draws):
                gen = make_generator(seed, step=start * draws + d, rank=0, stream="teacher-response-eval")
                t = sample_timesteps(ids.shape[0], time_epsilon=1e-3, generator=gen)
                masked = (torch.rand(ids.shape, generator=gen) < t[:, None]) & resp
                x_t = torch.where(masked, torch.full_like(ids, mask_id), ids)
                hidden = forward(model, x_t, ids, att)
                logits = (hidden[masked] @ model.lm_head.weight.T).float()
                nll = torch.nn.functional.cross_entropy(logits, ids[masked], reduction="none")
                weight = (1.0 / t)[:, None].expand_as(ids)[masked]
                total += float((nll * weight).sum()) / draws
    return total, count, ids_out


# --- building ---


def _write_text(rows: list[dict], path: Path, extra: str = "") -> Path:
    from tide_ds.experiments.transfer import TEMPLATE_WORDS

    with open(path, "w") as fh:
        for row in rows:
            fh.write(TEMPLATE_WORDS)
            for message in row["messages"]:
                fh.write(message["content"] + "\n")
        fh.write(extra)
    return path


def _source_texts(spec: EvidenceSpec) -> list[str]:
    """The source of the training split's files (held-out files excluded), for the teachers and A's tokenizer."""
    from tide_ds.data.corpus import split_of, stdlib_root, stdlib_source_files

    root = stdlib_root()
    files = stdlib_source_files()
    texts = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        if split_of(rel, heldout_fraction=spec.heldout_fraction) == "train":
            texts.append(path.read_text(encoding="utf-8"))
    if spec.max_files:
        texts = texts[: spec.max_files]
    return texts


def _windows(tokenizer_dir: Path, texts: list[str], length: int, cap: int, seed: int) -> dict[str, list]:
    """Non-overlapping windows of ``length`` tokens of the texts (each file ends with EOS), as teacher columns."""
    from tide_ds.data.tokenizers import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    eos = tok.eos_token_id
    stream: list[int] = []
    for enc in tok(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(enc)
        stream.append(eos)
    windows = [stream[i: i + length] for i in range(0, len(stream) - length + 1, length)]
    if cap and len(windows) > cap:
        windows = random.Random(seed).sample(windows, cap)
    return {"teacher_input_ids": windows, "teacher_attention_mask": [[1] * length for _ in windows]}


def _preprocess(pipeline: str, jsonl: Path, out: Path, spec: EvidenceSpec, student_tok: Path, teacher_tok: Path) -> Path:
    from tide_ds.data.preprocess import PreprocessConfig, preprocess

    preprocess(PreprocessConfig(
        pipeline=pipeline, input=jsonl, student_tokenizer=student_tok, teacher_tokenizer=teacher_tok, out=out,
        seq_len=spec.seq_len, teacher_seq_len=spec.teacher_seq_len, block_size=spec.block_size,
        heldout_fraction=spec.heldout_fraction, num_proc=1,
    ))
    return out


def _settings(full: Path, out_limited: Path, spec: EvidenceSpec) -> tuple[Path, int, int]:
    """The limited setting: a fixed random ``limited_fraction`` of the training rows; the same held-out rows."""
    import datasets

    splits = datasets.load_from_disk(str(full))
    n = len(splits["train"])
    keep = sorted(random.Random(f"limited-{spec.seed}").sample(range(n), max(1, round(n * spec.limited_fraction))))
    datasets.DatasetDict({"train": splits["train"].select(keep), "heldout": splits["heldout"]}).save_to_disk(
        str(out_limited))
    return out_limited, len(keep), n


def _teacher_data(dataset: Path, windows: dict[str, list], out: Path) -> Path:
    """Every training sample's teacher side plus the source windows (train), the held-out samples (heldout)."""
    import datasets

    splits = datasets.load_from_disk(str(dataset))
    cols = ["teacher_input_ids", "teacher_attention_mask"]
    chats = splits["train"].select_columns(cols)
    source = datasets.Dataset.from_dict(windows, features=chats.features)
    train = datasets.concatenate_datasets([chats, source])
    datasets.DatasetDict({"train": train, "heldout": splits["heldout"].select_columns(cols)}).save_to_disk(str(out))
    return out


def _take_heldout(jsonl: Path, out: Path, spec: EvidenceSpec) -> Path:
    """The corpus with at most ``max_heldout`` held-out rows (the first, in corpus order)."""
    from tide_ds.data.instruct_corpus import split_of_row

    seen = 0
    with open(jsonl) as src, open(out, "w") as dst:
        for line in src:
            row = json.loads(line)
            if split_of_row(row, heldout_fraction=spec.heldout_fraction) == "heldout":
                seen += 1
                if seen > spec.max_heldout:
                    continue
            dst.write(line)
    return out


def _measure_teacher(path: Path, pipeline: str, dataset: Path, spec: EvidenceSpec, tokenizer_dir: Path,
                     mask_id: int) -> dict:
    import datasets

    from tide_ds.data.tokenizers import load_tokenizer
    from tide_ds.models import wedlm
    from tide_ds.models.llada2_moe import load_llada2_moe, teacher_forward_hidden

    split = datasets.load_from_disk(str(dataset))["heldout"]
    if pipeline == "A":
        model = load_llada2_moe(path)

        def forward(m, x_t, x_0, att):
            return teacher_forward_hidden(m, x_t, attention_mask_BL=att)
    else:
        model = wedlm.load_wedlm(path)

        def forward(m, x_t, x_0, att):
            return wedlm.teacher_forward_hidden(m, x_t, x_0_BL=x_0, block_size=spec.block_size, attention_mask_BL=att,
                                                concat_order="x0_xt")
    model = model.float()
    nats, tokens, ids = response_elbo(model, split, pipeline=pipeline, mask_id=mask_id, forward=forward,
                                      seed=spec.seed, draws=spec.eval_draws)
    n_bytes = response_bytes(load_tokenizer(tokenizer_dir), ids)
    record = json.loads((path / "tide_ds_pretrain.json").read_text())
    return {"heldout_nats": nats, "tokens": tokens, "bytes": n_bytes, "nll_per_token": nats / max(tokens, 1),
            "bits_per_byte": bits_per_byte(nats, n_bytes), "pretraining": record}


def _pretrain_teacher(spec: EvidenceSpec, *, pipeline: str, data: str, out: str, tokenizer: str, vocab_size: int,
                      mask_id: int, eos_id: int, pad_id: int) -> dict:
    """Pretrain pipeline ``pipeline``'s teacher (a worker process: one thread)."""
    import torch

    from tide_ds.worlds.pretrain import pretrain_llada2_teacher, pretrain_wedlm_teacher

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s teacher {pipeline}: %(message)s")
    steps = spec.teacher_steps if pipeline == "A" else spec.teacher_steps_b
    common = dict(steps=steps, batch_size=spec.teacher_batch, lr=spec.teacher_lr, seed=spec.seed,
                  vocab_size=vocab_size, mask_token_id=mask_id, eos_token_id=eos_id, tokenizer_dir=tokenizer)
    if pipeline == "A":
        return pretrain_llada2_teacher(data, out, config=spec.teacher_config_a, **common)
    return pretrain_wedlm_teacher(data, out, pad_token_id=pad_id, block_size=spec.block_size,
                                  config=spec.teacher_config_b, **common)


def ensure_student_init(spec: EvidenceSpec, *, dataset: str | Path, tokenizer: str | Path, root: str | Path) -> dict:
    """The students' starting point of ``spec``, trained once and cached as ``<root>/students/init-<key>``
    (:meth:`EvidenceSpec.student_init_key`; a Hugging Face directory) with its record ``init-<key>.json``.

    ``launch/run.py`` with the student recipe and no distillation (CE alone) on ``dataset`` (the limited training
    samples), one rank, one thread; then exported (``python -m tide_ds.export``'s path). Every evidence run starts
    from it (``--model.path``), as the paper's students all start from one pretrained checkpoint. A build that died
    half-way starts over. Returns the record (path, steps, samples, lr, held-out NLL by step, wall seconds)."""
    import os
    import subprocess
    import sys

    from tide_ds.config import REPO_ROOT, resolve_repo_path
    from tide_ds.dist import single_rank_env
    from tide_ds.export import export_checkpoint
    from tide_ds.utils.files import atomic_write_text, file_lock

    students = Path(root).absolute() / "students"
    students.mkdir(parents=True, exist_ok=True)
    key = spec.student_init_key()
    out, run_dir, record_path = students / f"init-{key}", students / f".init-{key}-run", students / f"init-{key}.json"
    with file_lock(students / f".init-{key}.lock"):
        if record_path.is_file():
            logger.info("evidence world: the students' starting point reused from %s", out)
            return json.loads(record_path.read_text())
        for stale in (out, run_dir):
            shutil.rmtree(stale, ignore_errors=True)
        env = {**os.environ, **single_rank_env(), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "PYTHONUNBUFFERED": "1"}
        steps = spec.student_init_steps
        args = [sys.executable, str(REPO_ROOT / "launch" / "run.py"),
                f"--recipe={resolve_repo_path(spec.student_recipe).absolute()}", f"--model.tokenizer={tokenizer}",
                f"--data.dataset={dataset}", "--distill.pipeline=A", "--distill.preset=none", f"--train.seed={spec.seed}",
                f"--train.max_steps={steps}", f"--train.micro_batch_size={spec.student_init_batch}",
                f"--train.lr={spec.student_init_lr}", f"--train.eval_every={max(1, steps // 4)}",
                "--data.eval_samples=0",  # every held-out sample, as the evidence runs evaluate
                f"--train.save_every={steps}", "--train.keep_last=1", "--train.progress_bar=false",
                "--train.tensorboard=false", f"--train.output_dir={run_dir}"]
        log = students / f"init-{key}.log"
        start = time.perf_counter()
        logger.info("evidence world: training the students' starting point (%d CE steps of %d; log %s)", steps,
                    spec.student_init_batch, log)
        with open(log, "w") as fh:
            code = subprocess.run(args, cwd=REPO_ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
        if code != 0:
            tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
            raise RuntimeError(f"the students' starting point failed (exit {code}); its log {log} ends:\n{tail}")
        export_checkpoint(run_dir, out)
        records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
        evals = {str(r["step"]): r["nll"] for r in records if r.get("kind") == "eval"}  # str keys, as in JSON
        record = {"path": str(out), "key": key, "steps": steps, "samples": steps * spec.student_init_batch,
                  "lr": spec.student_init_lr, "heldout_nll": float(evals[str(steps)]), "heldout_nll_by_step": evals,
                  "wall_s": round(time.perf_counter() - start, 1)}
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # exported; the run's metrics and config stay
        atomic_write_text(record_path, json.dumps(record, indent=1))
    return record


def build_evidence_world(root: str | Path, spec: EvidenceSpec = EvidenceSpec()) -> EvidenceWorld:
    """Build (or reuse) the world of ``spec`` under ``root/world-<key>``; see the module docstring."""
    from tide_ds.data.instruct_corpus import ensure_instruct_jsonl, split_of_row
    from tide_ds.data.more_tokenizers import train_sentencepiece_tokenizer
    from tide_ds.data.tokenizers import load_tokenizer, resolve_special_ids
    from tide_ds.experiments.transfer import STUDENT_SPECIALS
    from tide_ds.utils.files import file_lock

    root = Path(root).absolute() / f"world-{spec.key()}"
    record = root / "world.json"
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root.parent / f".world-{spec.key()}.lock"):
        if record.is_file():
            return EvidenceWorld.from_json(json.loads(record.read_text()))
        for child in root.iterdir():  # a build that died half-way: start over
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        start = time.perf_counter()
        corpus = ensure_instruct_jsonl(max_files=spec.max_files or None, heldout_fraction=spec.heldout_fraction)
        jsonl = _take_heldout(corpus, root / "corpus.jsonl", spec)
        rows = [json.loads(line) for line in open(jsonl)]
        train_rows = [r for r in rows if split_of_row(r, heldout_fraction=spec.heldout_fraction) == "train"]
        sources = _source_texts(spec)
        student_tok = train_sentencepiece_tokenizer(
            [_write_text(train_rows, root / "student.txt")], root / "student-tokenizer", vocab_size=spec.student_vocab,
            special_tokens=STUDENT_SPECIALS, seed=spec.seed)
        teacher_text = root / "teacher.txt"
        teacher_text.write_text("\n".join(sources))
        teacher_tok = train_sentencepiece_tokenizer([teacher_text], root / "teacher-tokenizer",
                                                    vocab_size=spec.teacher_vocab, seed=spec.seed)
        logger.info("evidence world: tokenizers in %.1f s", time.perf_counter() - start)
        full_a = _preprocess("A", jsonl, root / "pipeline-a-full", spec, student_tok, teacher_tok)
        full_b = _preprocess("B", jsonl, root / "pipeline-b-full", spec, student_tok, student_tok)
        lim_a, n_lim, n_full = _settings(full_a, root / "pipeline-a-limited", spec)
        lim_b, _, _ = _settings(full_b, root / "pipeline-b-limited", spec)
        logger.info("evidence world: datasets in %.1f s", time.perf_counter() - start)

        s_special = resolve_special_ids(load_tokenizer(student_tok))
        t_special = resolve_special_ids(load_tokenizer(teacher_tok))
        win_a = _windows(teacher_tok, sources, spec.teacher_seq_len, spec.source_windows, spec.seed)
        win_b = _windows(student_tok, sources, spec.teacher_seq_len, spec.source_windows, spec.seed)
        data_a = _teacher_data(full_a, win_a, root / "teacher-data-a")
        data_b = _teacher_data(full_b, win_b, root / "teacher-data-b")
        teachers = root.parent / "teachers"
        teachers.mkdir(exist_ok=True)
        out_a, out_b = teachers / f"A-{spec.teacher_key('A')}", teachers / f"B-{spec.teacher_key('B')}"
        jobs = {
            "A": dict(pipeline="A", data=str(data_a), out=str(out_a), tokenizer=str(teacher_tok),
                      vocab_size=-(-t_special.vocab_size // 64) * 64, mask_id=t_special.mask_id, eos_id=t_special.eos_id,
                      pad_id=t_special.eos_id),
            "B": dict(pipeline="B", data=str(data_b), out=str(out_b), tokenizer=str(student_tok),
                      vocab_size=-(-s_special.vocab_size // 64) * 64, mask_id=s_special.mask_id, eos_id=s_special.eos_id,
                      pad_id=s_special.pad_id),
        }
        todo = {p: job for p, job in jobs.items() if not (Path(job["out"]) / "tide_ds_pretrain.json").is_file()}
        for p in sorted(set(jobs) - set(todo)):
            logger.info("evidence world: teacher %s reused from %s", p, jobs[p]["out"])
        for job in todo.values():  # a pretraining that died half-way left its staging folder: start it over
            for stale in Path(job["out"]).parent.glob(f".{Path(job['out']).name}*"):
                shutil.rmtree(stale, ignore_errors=True)
        # The two teachers train side by side, one process and one thread each; the students' starting point takes
        # the first free worker (two at a time: many threads on a shared machine only wait for each other).
        workers = min(2, len(todo) + bool(spec.student_init_steps))  # a cached starting point takes no time
        with ProcessPoolExecutor(max_workers=max(1, workers), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_pretrain_teacher, spec, **job) for job in todo.values()]
            init_future = None
            if spec.student_init_steps:
                init_future = pool.submit(ensure_student_init, spec, dataset=str(lim_a), tokenizer=str(student_tok),
                                          root=str(root.parent))
            for future in futures:
                future.result()
            student_init = init_future.result() if init_future is not None else {}
        logger.info("evidence world: teachers and the students' starting point in %.1f s", time.perf_counter() - start)
        teacher = {
            "A": _measure_teacher(out_a, "A", full_a, spec, teacher_tok, t_special.mask_id),
            "B": _measure_teacher(out_b, "B", full_b, spec, student_tok, s_special.mask_id),
        }
        world = EvidenceWorld(
            root=root, student_tokenizer=student_tok, teacher_tokenizer=teacher_tok,
            datasets={"A/full": str(full_a), "A/limited": str(lim_a), "B/full": str(full_b), "B/limited": str(lim_b)},
            teacher_a=out_a, teacher_b=out_b, student_vocab_size=s_special.vocab_size,
            teacher=teacher, heldout=student_heldout_units(full_a, student_tok),
            sizes={"train_full": n_full, "train_limited": n_lim, "teacher_rows_a": n_full + len(win_a["teacher_input_ids"]),
                   "teacher_rows_b": n_full + len(win_b["teacher_input_ids"]),
                   "source_files": len(sources), "source_bytes": sum(len(t.encode()) for t in sources)},
            student_init=student_init,
        )
        record.write_text(json.dumps(world.to_json(), indent=1))
        logger.info("evidence world %s built in %.1f s: teacher bits/byte A %.3f, B %.3f; the students' starting point: "
                    "%s", root, time.perf_counter() - start, teacher["A"]["bits_per_byte"], teacher["B"]["bits_per_byte"],
                    f"held-out NLL {student_init['heldout_nll']:.4f} after {student_init['steps']} steps"
                    if student_init else "none (random weights)")
    return world


def _main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tide_ds.worlds.evidence", description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="runs/evidence-world", help="where the world is cached")
    parser.add_argument("--max-files", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    world = build_evidence_world(args.root, EvidenceSpec(max_files=args.max_files))
    print(json.dumps(world.to_json(), indent=1))


if __name__ == "__main__":
    _main()
