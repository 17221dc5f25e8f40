"""Does the teacher's knowledge reach the student? A small world where it must, and the runs that measure it.

    python -m tide_ds.experiments.transfer --out runs/transfer [--break zero_teacher|shuffle_alignment]

The world (:func:`build_world`, built by the project's own tokenizers, preprocessing and teacher
pretraining, cached under its key):

* a synthetic language: ``n_topics`` topics of ``words_per_topic`` made-up words; a sample is a chat whose
  prompt names a topic and whose response is ``response_words`` words drawn from that topic;
* the **student's** training text is the same language seen through a noisy channel: each response word
  is replaced, with probability ``noise``, by one of ``junk_per_topic`` junk words of its topic, which the
  language never uses (with the defaults each junk word is exactly as frequent as each real word, so
  nothing but knowledge of the language marks it). The student never sees a clean response; its
  held-out split is clean responses;
* the **teacher** is trained on clean text only, the held-out responses included (so it demonstrably
  knows the held-out text), as a masked diffusion LM: pipeline A a LLaDA2-layout MoE with its own
  SentencePiece tokenizer (a different segmentation from the student's; its tokenizer's corpus also holds
  the junk words as often as the real ones, so junk is not marked by how it splits, only by the
  teacher's weights), pipeline B a WeDLM-layout BD3LM with the student's tokenizer. A second teacher
  per pipeline keeps its random initial weights.

CE alone learns the noisy channel: it gives junk words the probability mass they have in its data.
A teacher that knows the clean language tells junk from words at every masked position (KL, TIDAL:
its distribution; CALM and Reverse CALM: its chunk likelihood, low on junk chunks, high on the rest),
so a student that receives that signal puts less mass on junk and more on the topic's words, and its
held-out NLL on clean text ends lower than CE's. The signal only helps if it arrives at the right
positions: misaligned chunks or flat teacher log-probs turn it into noise (:data:`BREAKS`).

The runs (:func:`run_plan`) are the trainer itself (:func:`tide_ds.trainer.loop.train`: a real
DeepSpeed engine, the teacher engine, :func:`~tide_ds.trainer.step.train_step`, the held-out evaluation)
in one process on one gloo rank, each variant from the same initial weights, data order and noise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import shutil
import socket
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

logger = logging.getLogger("tide_ds.experiments.transfer")

WORLD_FORMAT = 3

#: Student specials (Qwen3's chat format renders with them); eos/pad first, then the mask token last.
STUDENT_SPECIALS = ("<|im_end|>", "<|im_start|>", "<|endoftext|>", "<think>", "</think>", "<|mask|>")
#: Words of the chat templates, added to the tokenizer corpora so the templates tokenize compactly.
TEMPLATE_WORDS = "user\nassistant\nsystem\nSYSTEM\nHUMAN\nASSISTANT\ndetailed thinking off\n"

_CONSONANTS = "bdfgklmnprstv"
_VOWELS = "aeiou"


@dataclass(frozen=True)
class WorldSpec:
    """Everything that decides the world (its cache key)."""

    seed: int = 0
    n_topics: int = 8
    words_per_topic: int = 3
    junk_per_topic: int = 2
    response_words: int = 12
    noise: float = 0.4
    student_train: int = 256
    heldout: int = 64
    teacher_extra: int = 512  # clean samples only the teacher sees, besides the student's and the held-out ones
    seq_len: int = 64
    block_size: int = 16
    teacher_seq_len: int = 112
    student_vocab: int = 520
    teacher_vocab: int = 440
    teacher_steps: int = 400
    teacher_batch: int = 16
    teacher_lr: float = 1e-2
    teacher_config_a: dict = field(default_factory=lambda: dict(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1))
    teacher_config_b: dict = field(default_factory=lambda: dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, tie_word_embeddings=True))

    def key(self) -> str:
        data = json.dumps({"format": WORLD_FORMAT, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(data.encode()).hexdigest()[:12]


# --- the language ---


@dataclass(frozen=True)
class Language:
    """``topics`` names, each with its ``members`` (indices into ``words``); ``junk`` words the language never uses."""

    words: tuple[str, ...]
    junk: tuple[str, ...]
    topics: tuple[str, ...]
    members: tuple[tuple[int, ...], ...]


def _pseudo_words(rng: random.Random, n: int, consonants: str, taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        syllables = rng.choice((2, 2, 3))
        word = "".join(rng.choice(consonants) + rng.choice(_VOWELS) for _ in range(syllables))
        if word not in taken:
            taken.add(word)
            out.append(word)
    return out


def make_language(spec: WorldSpec) -> Language:
    rng = random.Random(f"language-{spec.seed}")
    taken: set[str] = set()
    n_words = spec.n_topics * spec.words_per_topic
    words = _pseudo_words(rng, n_words, _CONSONANTS, taken)
    topics = _pseudo_words(rng, spec.n_topics, _CONSONANTS, taken)
    junk = _pseudo_words(rng, spec.n_topics * spec.junk_per_topic, _CONSONANTS, taken)
    order = list(range(n_words))
    rng.shuffle(order)
    members = tuple(tuple(order[k * spec.words_per_topic:(k + 1) * spec.words_per_topic]) for k in range(spec.n_topics))
    return Language(tuple(words), tuple(junk), tuple(topics), members)


def sample(lang: Language, rng: random.Random, length: int) -> tuple[int, list[int]]:
    """A topic and ``length`` words drawn uniformly from its members."""
    topic = rng.randrange(len(lang.topics))
    return topic, [rng.choice(lang.members[topic]) for _ in range(length)]


def chat(lang: Language, topic: int, response: Sequence[str]) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"words of {lang.topics[topic]}"},
            {"role": "assistant", "content": " ".join(response)}]


def _source(split: str, i: int, fraction: float) -> str:
    """A ``source`` that :func:`tide_ds.data.corpus.split_of` puts into ``split`` (the preprocessing's split key)."""
    from tide_ds.data.corpus import split_of

    j = 0
    while split_of(f"{split}-{i}-{j}", heldout_fraction=fraction) != split:
        j += 1
    return f"{split}-{i}-{j}"


HELDOUT_FRACTION = 0.5  # only used to pick source names; the split sizes are the spec's


def world_rows(spec: WorldSpec) -> dict[str, list[dict]]:
    """The JSON-lines rows: ``student`` (noisy training samples + clean held-out samples) and ``teacher``
    (clean: the student's training samples, more samples, and the held-out samples)."""
    lang = make_language(spec)
    rng = random.Random(f"samples-{spec.seed}")
    noise_rng = random.Random(f"noise-{spec.seed}")
    student, teacher = [], []
    for i in range(spec.student_train + spec.heldout + spec.teacher_extra):
        start, path = sample(lang, rng, spec.response_words)
        clean = [lang.words[w] for w in path]
        if i < spec.student_train:
            noisy = [lang.junk[start * spec.junk_per_topic + noise_rng.randrange(spec.junk_per_topic)]
                     if noise_rng.random() < spec.noise else w for w in clean]
            student.append({"messages": chat(lang, start, noisy), "source": _source("train", i, HELDOUT_FRACTION)})
            teacher.append({"messages": chat(lang, start, clean), "source": _source("train", i, HELDOUT_FRACTION)})
        elif i < spec.student_train + spec.heldout:
            row = {"messages": chat(lang, start, clean), "source": _source("heldout", i, HELDOUT_FRACTION)}
            student.append(row)
            teacher.append(row)
        else:
            teacher.append({"messages": chat(lang, start, clean), "source": _source("train", i, HELDOUT_FRACTION)})
    return {"student": student, "teacher": teacher}


# --- building the world ---


@dataclass(frozen=True)
class TransferWorld:
    root: Path
    student_tokenizer: Path
    teacher_tokenizer: Path  # pipeline A's
    dataset_a: Path
    dataset_b: Path
    teacher_a: Path
    teacher_b: Path
    random_teacher_a: Path
    random_teacher_b: Path
    shared_vocab_size: int
    teacher_heldout_nll: dict[str, float]  # per pipeline, per teacher token, and before training

    def to_json(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def _write_jsonl(rows: list[dict], path: Path) -> Path:
    with open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return path


def _text_file(rows: list[dict], path: Path, extra_lines: Sequence[str] = ()) -> Path:
    with open(path, "w") as fh:
        for row in rows:
            fh.write(TEMPLATE_WORDS)  # as often as the chats use them: the templates tokenize compactly
            for message in row["messages"]:
                fh.write(message["content"] + "\n")
        for line in extra_lines:
            fh.write(line + "\n")
    return path


def junk_lexicon(spec: WorldSpec, rows: list[dict]) -> list[str]:
    """Lines holding each junk word as often as the language's words occur in ``rows`` on average: added to the
    teacher tokenizer's corpus, so that junk and words split into pieces alike and only the teacher's weights
    (not its tokenizer) tell them apart."""
    lang = make_language(spec)
    counts = {w: 0 for w in lang.words}
    for row in rows:
        for word in row["messages"][-1]["content"].split():
            counts[word] = counts.get(word, 0) + 1
    per_word = round(sum(counts[w] for w in lang.words) / len(lang.words))
    rng = random.Random(f"lexicon-{spec.seed}")
    tokens = [w for w in lang.junk for _ in range(per_word)]
    rng.shuffle(tokens)
    n = spec.response_words
    return [" ".join(tokens[i:i + n]) for i in range(0, len(tokens), n)]


def _preprocess(pipeline: str, jsonl: Path, out: Path, spec: WorldSpec, student_tok: Path, teacher_tok: Path) -> Path:
    from tide_ds.data.preprocess import PreprocessConfig, preprocess

    result = preprocess(PreprocessConfig(
        pipeline=pipeline, input=jsonl, student_tokenizer=student_tok, teacher_tokenizer=teacher_tok, out=out,
        seq_len=spec.seq_len, teacher_seq_len=spec.teacher_seq_len, block_size=spec.block_size,
        heldout_fraction=HELDOUT_FRACTION, num_proc=1,
    ))
    rows = result.summary["rows"]
    if rows["dropped"]:
        raise RuntimeError(f"preprocessing {jsonl} dropped rows: {json.dumps(result.summary)}")
    return out


def _teacher_splits(dataset: Path, out: Path) -> Path:
    """The teacher's pretraining data: it trains on every clean sample, the held-out ones included."""
    import datasets

    splits = datasets.load_from_disk(str(dataset))
    both = datasets.concatenate_datasets([splits["train"], splits["heldout"]])
    datasets.DatasetDict({"train": both, "heldout": splits["heldout"]}).save_to_disk(str(out))
    return out


def build_world(root: str | Path, spec: WorldSpec = WorldSpec()) -> TransferWorld:
    """Build (or reuse) the world of ``spec`` under ``root/<key>``; see the module docstring."""
    from tide_ds.data.more_tokenizers import train_sentencepiece_tokenizer
    from tide_ds.data.tokenizers import load_tokenizer, resolve_special_ids
    from tide_ds.models import wedlm
    from tide_ds.models.llada2_moe import write_tiny_llada2_moe_checkpoint
    from tide_ds.utils.files import file_lock
    from tide_ds.worlds.pretrain import pretrain_llada2_teacher, pretrain_wedlm_teacher

    root = Path(root) / f"world-{spec.key()}"
    record = root / "world.json"
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root.parent / f".world-{spec.key()}.lock"):
        if record.is_file():
            data = json.loads(record.read_text())
            return TransferWorld(**{k: Path(v) if isinstance(v, str) else v for k, v in data.items()})
        for child in root.iterdir():  # a build that died half-way: start over
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        start = time.perf_counter()
        rows = world_rows(spec)
        student_jsonl = _write_jsonl(rows["student"], root / "student.jsonl")
        teacher_jsonl = _write_jsonl(rows["teacher"], root / "teacher.jsonl")
        student_train = [r for r in rows["student"] if r["source"].startswith("train")]
        student_tok = train_sentencepiece_tokenizer(
            [_text_file(student_train, root / "student.txt")], root / "student-tokenizer", vocab_size=spec.student_vocab,
            special_tokens=STUDENT_SPECIALS, seed=spec.seed)
        teacher_tok = train_sentencepiece_tokenizer(
            [_text_file(rows["teacher"], root / "teacher.txt", junk_lexicon(spec, rows["teacher"]))],
            root / "teacher-tokenizer", vocab_size=spec.teacher_vocab,
            seed=spec.seed)
        logger.info("transfer world: tokenizers in %.1f s", time.perf_counter() - start)
        dataset_a = _preprocess("A", student_jsonl, root / "pipeline-a", spec, student_tok, teacher_tok)
        dataset_b = _preprocess("B", student_jsonl, root / "pipeline-b", spec, student_tok, student_tok)
        clean_a = _teacher_splits(_preprocess("A", teacher_jsonl, root / "clean-a", spec, student_tok, teacher_tok),
                                  root / "teacher-data-a")
        clean_b = _teacher_splits(_preprocess("B", teacher_jsonl, root / "clean-b", spec, student_tok, student_tok),
                                  root / "teacher-data-b")
        logger.info("transfer world: datasets in %.1f s", time.perf_counter() - start)

        s_special = resolve_special_ids(load_tokenizer(student_tok))
        t_special = resolve_special_ids(load_tokenizer(teacher_tok))
        a_vocab = -(-t_special.vocab_size // 64) * 64
        b_vocab = -(-s_special.vocab_size // 64) * 64
        common = dict(steps=spec.teacher_steps, batch_size=spec.teacher_batch, lr=spec.teacher_lr, seed=spec.seed)
        result_a = pretrain_llada2_teacher(
            clean_a, root / "teacher-a", vocab_size=a_vocab, mask_token_id=t_special.mask_id,
            eos_token_id=t_special.eos_id, config=spec.teacher_config_a, tokenizer_dir=teacher_tok, **common)
        logger.info("transfer world: teacher A in %.1f s", time.perf_counter() - start)
        result_b = pretrain_wedlm_teacher(
            clean_b, root / "teacher-b", vocab_size=b_vocab, mask_token_id=s_special.mask_id,
            eos_token_id=s_special.eos_id, pad_token_id=s_special.pad_id, block_size=spec.block_size,
            config=spec.teacher_config_b, tokenizer_dir=student_tok, **common)
        logger.info("transfer world: teacher B in %.1f s", time.perf_counter() - start)
        random_a = write_tiny_llada2_moe_checkpoint(
            root / "random-teacher-a", seed=spec.seed + 1, vocab_size=a_vocab, mask_token_id=t_special.mask_id,
            eos_token_id=t_special.eos_id, pad_token_id=t_special.eos_id, **spec.teacher_config_a)
        random_b = wedlm.write_tiny_wedlm_checkpoint(
            root / "random-teacher-b", seed=spec.seed + 1, vocab_size=b_vocab, mask_token_id=s_special.mask_id,
            eos_token_id=s_special.eos_id, pad_token_id=s_special.pad_id, bos_token_id=s_special.pad_id,
            **spec.teacher_config_b)
        world = TransferWorld(
            root=root, student_tokenizer=student_tok, teacher_tokenizer=teacher_tok, dataset_a=dataset_a,
            dataset_b=dataset_b, teacher_a=root / "teacher-a", teacher_b=root / "teacher-b", random_teacher_a=random_a,
            random_teacher_b=random_b, shared_vocab_size=spec.student_vocab,
            teacher_heldout_nll={"A": result_a["heldout_nll"], "A_before": result_a["heldout_nll_before"],
                                 "B": result_b["heldout_nll"], "B_before": result_b["heldout_nll_before"]},
        )
        record.write_text(json.dumps(world.to_json(), indent=1))
        logger.info("transfer world %s built in %.1f s", root, time.perf_counter() - start)
    return world


# --- the runs ---


@dataclass(frozen=True)
class Variant:
    """One student run: ``name`` (pipeline/what), the preset, the teacher (trained, random or none)."""

    name: str
    pipeline: str
    preset: str
    teacher: str  # "trained" | "random" | "none"
    overrides: tuple[str, ...] = ()

    @property
    def baseline(self) -> str:
        return f"{self.pipeline}/ce"


#: The CE-only baselines see the same masks as the distilled runs of their pipeline: on A, CALM with
#: calm_weight=0 (chunk-consistent masks, the teacher's term switched off); on B, preset none (pipeline B
#: masks tokens exactly as CE does).
VARIANTS = (
    Variant("A/ce", "A", "calm", "trained", ("--distill.calm_weight=0",)),
    Variant("A/calm", "A", "calm", "trained"),
    Variant("A/tide_cross", "A", "tide_cross", "trained"),
    Variant("A/tide_shared", "A", "tide_shared", "trained"),
    Variant("A/calm_random", "A", "calm", "random"),
    Variant("A/tide_cross_random", "A", "tide_cross", "random"),
    Variant("A/tide_shared_random", "A", "tide_shared", "random"),
    Variant("B/ce", "B", "none", "none"),
    Variant("B/kl", "B", "kl", "trained"),
    Variant("B/tide_shared", "B", "tide_shared", "trained"),
    Variant("B/kl_random", "B", "kl", "random"),
    Variant("B/tide_shared_random", "B", "tide_shared", "random"),
)


@dataclass(frozen=True)
class RunSpec:
    """The students' recipe (the same for every variant)."""

    seed: int = 1
    steps: int = 80
    micro_batch_size: int = 16
    lr: float = 3e-3
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16


def run_overrides(world: TransferWorld, spec: WorldSpec, run: RunSpec, variant: Variant, out: Path) -> list[str]:
    dataset = world.dataset_a if variant.pipeline == "A" else world.dataset_b
    args = [
        f"--data.dataset={dataset}", f"--model.tokenizer={world.student_tokenizer}",
        f"--data.seq_len={spec.seq_len}", f"--diffusion.block_size={spec.block_size}", "--data.eval_samples=0",
        f"--model.hidden_size={run.hidden_size}", f"--model.intermediate_size={run.intermediate_size}",
        f"--model.num_layers={run.num_layers}", f"--model.num_heads={run.num_heads}",
        f"--model.num_kv_heads={run.num_kv_heads}", f"--model.head_dim={run.head_dim}",
        f"--train.seed={run.seed}", f"--train.max_steps={run.steps}", f"--train.micro_batch_size={run.micro_batch_size}",
        f"--train.lr={run.lr}", f"--train.log_every={run.steps}", "--train.eval_every=0", "--train.progress_bar=false",
        "--train.report_to=jsonl", "--train.preempt_signals=", "--train.ds_config=ds_configs/zero2.json",
        f"--train.output_dir={out}", f"--distill.preset={variant.preset}", f"--distill.pipeline={variant.pipeline}",
    ]
    if variant.teacher != "none":
        teacher = {("A", "trained"): world.teacher_a, ("A", "random"): world.random_teacher_a,
                   ("B", "trained"): world.teacher_b, ("B", "random"): world.random_teacher_b}[variant.pipeline, variant.teacher]
        args += [f"--teacher.path={teacher}", "--teacher.placement=replicate"]
    if variant.pipeline == "B":
        args.append(f"--distill.shared_vocab_size={world.shared_vocab_size}")
    return args + list(variant.overrides)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_rank_env() -> None:
    """One gloo rank in this process (the trainer's own init_distributed then starts it)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)


def run_variant(world: TransferWorld, spec: WorldSpec, run: RunSpec, variant: Variant, out: Path) -> dict:
    """Train one student with the trainer; its held-out NLL at step 0 and at the end, and the wall time."""
    from tide_ds.config import build_config
    from tide_ds.trainer.loop import train

    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    cfg = build_config(overrides=run_overrides(world, spec, run, variant, out))
    start = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in records if r["kind"] == "eval"}
    train_records = [r for r in records if r["kind"] == "train"]
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # not needed: keep the record small
    return {"variant": variant.name, "nll_start": evals[0]["nll"], "nll": evals[run.steps]["nll"],
            "masked_ce": evals[run.steps]["masked_ce"], "train": train_records[-1] if train_records else {},
            "wall_s": wall}


# --- breaking the path on purpose (the test must then fail) ---

#: Ways to cut the teacher's signal off from the student, for checking that the transfer test notices:
#: ``zero_teacher``: every teacher output is replaced by zeros: target log-probs (A) and row hidden states
#: (B, so its logits are uniform);
#: ``shuffle_alignment``: each row's teacher chunk ids (A) are permuted among its chunks, and its aligned
#: teacher positions (B) are rolled by one pair, so the teacher's verdicts land on the wrong student tokens.
BREAKS = ("zero_teacher", "shuffle_alignment")


def apply_break(kind: str, world: TransferWorld, out: Path) -> TransferWorld:
    """Return ``world`` with its teacher signal broken as ``kind`` says (datasets rewritten under ``out``)."""
    if kind not in BREAKS:
        raise ValueError(f"--break={kind!r} is not one of {list(BREAKS)}")
    if kind == "zero_teacher":
        import torch

        from tide_ds.teacher.engine import TeacherEngine

        original = TeacherEngine.__call__

        def zeroed(self, *args, **kwargs):
            # Every teacher output (pipeline A's target log-probs, pipeline B's rows) goes through __call__.
            return tuple(None if out is None else torch.zeros_like(out) for out in original(self, *args, **kwargs))

        TeacherEngine.__call__ = zeroed  # type: ignore[method-assign]
        return world
    import datasets
    import numpy as np

    rng = np.random.default_rng(0)

    def shuffle_chunks(row):
        t = np.asarray(row["teacher_chunk_ids"])
        ids = np.unique(t[t >= 0])
        mapping = dict(zip(ids.tolist(), rng.permutation(ids).tolist()))
        row["teacher_chunk_ids"] = [mapping.get(int(c), -1) for c in t]
        return row

    def roll_pairs(row):
        n = int(row["n_aligned"])
        t = list(row["align_teacher"])
        row["align_teacher"] = t[1:n] + t[:1] + t[n:] if n > 1 else t
        return row

    out.mkdir(parents=True, exist_ok=True)
    broken = {}
    for name, path, fn in (("a", world.dataset_a, shuffle_chunks), ("b", world.dataset_b, roll_pairs)):
        splits = datasets.load_from_disk(str(path))
        target = out / f"broken-{name}"
        shutil.rmtree(target, ignore_errors=True)
        datasets.DatasetDict({k: v.map(fn) for k, v in splits.items()}).save_to_disk(str(target))
        broken[name] = target
    return replace(world, dataset_a=broken["a"], dataset_b=broken["b"])


# --- the plan and the command line ---


def run_plan(out: str | Path, *, pipelines: Sequence[str] = ("A", "B"), world_root: str | Path | None = None,
             spec: WorldSpec = WorldSpec(), run: RunSpec = RunSpec(), breakage: str | None = None) -> dict:
    """Build (or reuse) the world, train every variant of ``pipelines``; write and return ``results.json``."""
    import torch

    torch.set_num_threads(1)  # one thread per process: several of these share the cores
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    world = build_world(world_root or out / "worlds", spec)
    if breakage:
        world = apply_break(breakage, world, out / "broken")
    _single_rank_env()
    results = {"world": world.to_json(), "spec": asdict(spec), "run": asdict(run), "break": breakage, "runs": {}}
    try:
        for variant in VARIANTS:
            if variant.pipeline in pipelines:
                result = run_variant(world, spec, run, variant, out / "runs" / variant.name.replace("/", "_"))
                results["runs"][variant.name] = result
                logger.info("transfer %s: held-out NLL %.4f -> %.4f (%.1f s)", variant.name, result["nll_start"],
                            result["nll"], result["wall_s"])
    finally:
        from tide_ds.trainer.loop import shutdown

        shutdown()
    name = "results-" + "".join(pipelines) + ".json"
    (out / name).write_text(json.dumps(results, indent=1))
    return results


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tide_ds.experiments.transfer", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory (results-<pipelines>.json, runs/)")
    parser.add_argument("--pipelines", default="AB", help="which pipelines' variants to run: A, B or AB")
    parser.add_argument("--world-root", default=None, help="where worlds are cached (default: OUT/worlds)")
    parser.add_argument("--break", dest="breakage", default=None, choices=BREAKS,
                        help="cut the teacher's signal on purpose (the transfer test must then fail)")
    parser.add_argument("--steps", type=int, default=RunSpec.steps)
    parser.add_argument("--seed", type=int, default=RunSpec.seed)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    results = run_plan(args.out, pipelines=tuple(args.pipelines), world_root=args.world_root,
                       run=RunSpec(steps=args.steps, seed=args.seed), breakage=args.breakage)
    runs = results["runs"]
    for name, r in runs.items():
        base = runs.get(name.split("/")[0] + "/ce")
        delta = f"{r['nll'] - base['nll']:+.4f}" if base else ""
        print(f"{name:24s} held-out NLL {r['nll_start']:.4f} -> {r['nll']:.4f}  vs CE {delta}")


if __name__ == "__main__":
    _main()
