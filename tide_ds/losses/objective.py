"""The distillation objective as a typed object: mode strings and paper presets (docs/method.md §9-§10).

The reference selects its loss with a structured string (``distill_mode``: ``alm``, ``reverse_alm``,
``alm_taid``, ``reverse_alm_taid``, ``kl``, ``reverse_kl``, ``taid``, their ``_aligned`` forms, and
``+`` sums such as ``taid_aligned+kl_aligned``). :func:`parse_mode` reads such a string once into an
:class:`ObjectiveSpec`; :func:`preset_objective` maps the paper's named variants (docs/method.md §9.3) per pipeline.
Downstream code reads the spec's fields and never inspects the string again.

Pipeline A (cross tokenizer, chunk-level terms): CALM, Reverse CALM, chunk TIDAL. Pipeline B (shared
tokenizer, token-level terms): KL, reverse KL, token TIDAL, summable, on all masked positions
(non-aligned teacher forward, docs/method.md §3.2) or on aligned rows (``_aligned``, docs/method.md §3.3). The CE term is always on.

Stricter than the reference (each rejected with its reason): a ``+`` sum must be all ``_aligned`` or
all plain (the reference strips ``_aligned`` part by part, so ``kl_aligned+taid`` ran both aligned);
a term may appear once per sum; CompDemo needs a distillation term.
"""

from __future__ import annotations

import difflib
import enum
import warnings
from dataclasses import dataclass
from typing import Literal, get_args

from tide_ds.errors import ConfigError

__all__ = ["MODES", "PRESETS", "LossTerm", "Preset", "ObjectiveSpec", "Pipeline", "TermKind", "parse_mode", "preset_objective",
           "preset_pipelines"]


class Pipeline(enum.Enum):
    """Which teacher / data path a run needs (docs/method.md §0)."""

    #: Cross tokenizer (LLaDA2.0-mini teacher): alignment chunks, chunk-level terms.
    A = "A"
    #: Shared tokenizer (WeDLM-8B teacher): token-level terms on the shared vocabulary prefix.
    B = "B"


class TermKind(enum.Enum):
    """The four distillation losses (docs/method.md §5, §6, §7.3, §7.4)."""

    CALM = "calm"
    CHUNK_TIDAL = "calm_tidal"
    KL = "kl"
    TIDAL = "tidal"


_CHUNK_KINDS = (TermKind.CALM, TermKind.CHUNK_TIDAL)
#: Reference mode name of each (kind, reverse) term.
_TERM_MODES = {
    (TermKind.CALM, False): "alm",
    (TermKind.CALM, True): "reverse_alm",
    (TermKind.CHUNK_TIDAL, False): "alm_taid",
    (TermKind.CHUNK_TIDAL, True): "reverse_alm_taid",
    (TermKind.KL, False): "kl",
    (TermKind.KL, True): "reverse_kl",
    (TermKind.TIDAL, False): "taid",
}
_MODE_TERMS = {mode: key for key, mode in _TERM_MODES.items()}
_TOKEN_PARTS = ("kl", "reverse_kl", "taid")
_CHUNK_PARTS = ("alm", "reverse_alm", "alm_taid", "reverse_alm_taid")

#: Every single mode of the reference; ``+`` sums of token-level parts are valid too.
MODES = _CHUNK_PARTS + _TOKEN_PARTS + tuple(f"{part}_aligned" for part in _TOKEN_PARTS)
#: The paper's named variants (docs/method.md §9.3); all include the CE term. The type of ``distill.preset``.
Preset = Literal["none", "calm", "tide_cross", "tide_shared", "kl"]
PRESETS: tuple[str, ...] = get_args(Preset)

_VALID_MODES_TEXT = (
    f"valid modes are {list(MODES)} or a '+' sum of distinct parts from {list(_TOKEN_PARTS)} "
    "(all with or all without the _aligned suffix)"
)


@dataclass(frozen=True)
class LossTerm:
    """One distillation term: a loss kind and its direction."""

    kind: TermKind
    #: Reverse direction (student distribution first): Reverse CALM, reverse KL, reverse chunk TIDAL.
    reverse: bool = False

    def __post_init__(self) -> None:
        if (self.kind, self.reverse) not in _TERM_MODES:
            raise ConfigError("distill.mode: token-level TIDAL has no reverse form (docs/method.md §7.3 is a forward KL)")

    @property
    def name(self) -> str:
        """Logging name: ``calm``, ``calm_rev``, ``calm_tidal``, ``calm_tidal_rev``, ``kl``, ``kl_rev``, ``tidal``."""
        return self.kind.value + ("_rev" if self.reverse else "")

    @property
    def mode(self) -> str:
        """The reference's name of this term (``reverse_alm``, ``taid``, ...)."""
        return _TERM_MODES[(self.kind, self.reverse)]

    @property
    def chunk_level(self) -> bool:
        return self.kind in _CHUNK_KINDS

    @property
    def uses_tidal(self) -> bool:
        return self.kind in (TermKind.TIDAL, TermKind.CHUNK_TIDAL)

    @property
    def weight_group(self) -> Literal["calm", "kl", "tidal"]:
        """Which weight scales the term (docs/method.md §10): the CALM weight also covers chunk TIDAL."""
        if self.chunk_level:
            return "calm"
        return "tidal" if self.kind is TermKind.TIDAL else "kl"

    @property
    def temperature_group(self) -> Literal["calm", "kl"]:
        """Which temperature the term uses (docs/method.md §9.2): token TIDAL shares the KL temperature."""
        return "calm" if self.chunk_level else "kl"


@dataclass(frozen=True)
class ObjectiveSpec:
    """The parsed distillation objective: ``L = CE + sum_terms weight * term`` (docs/method.md §10)."""

    #: Distillation terms, summed; empty = CE only (the BD3LM baseline).
    terms: tuple[LossTerm, ...] = ()
    #: Pipeline B on aligned rows with the teacher's own chat template (docs/method.md §3.3) instead of all masked positions.
    aligned: bool = False
    #: CompDemo: two complementary teacher passes (docs/method.md §8).
    comp_demo: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "terms", tuple(self.terms))
        if len(set(self.terms)) != len(self.terms):
            raise ConfigError(f"distill.mode={self.mode!r}: each term may appear once in a sum")
        n_chunk = sum(term.chunk_level for term in self.terms)
        if n_chunk and n_chunk != len(self.terms):
            raise ConfigError(
                f"distill.mode={self.mode!r}: chunk-level (CALM) terms need pipeline A and token-level terms "
                "pipeline B; they cannot be combined"
            )
        if n_chunk > 1:
            raise ConfigError(f"distill.mode={self.mode!r}: ALM modes cannot be composed (one CALM term per run)")
        if self.aligned and (n_chunk or not self.terms):
            raise ConfigError(
                "distill.mode: _aligned applies to pipeline-B token terms only (CALM chunks already align "
                "the two tokenizations)"
            )
        if self.comp_demo and not self.terms:
            raise ConfigError(
                "distill.comp_demo=True needs a distillation term: CompDemo only changes the teacher passes"
            )
        self._warn_tidal_with_reverse()

    def _warn_tidal_with_reverse(self) -> None:
        kinds = {(term.kind, term.reverse) for term in self.terms}
        if (TermKind.CHUNK_TIDAL, True) in kinds:
            warnings.warn(
                f"distill.mode={self.mode!r}: TIDAL with a reverse objective is counterproductive (docs/method.md §7.5): "
                "the mixed target (1 - lambda) s + lambda q lets the student's own s set the sign of the "
                "Reverse CALM gradient, losing its teacher-only bounded gate; use it for ablations only "
                "(recommended: 'reverse_alm' or 'alm_taid')",
                UserWarning,
                stacklevel=2,
            )
        elif (TermKind.TIDAL, False) in kinds and (TermKind.KL, True) in kinds:
            warnings.warn(
                f"distill.mode={self.mode!r}: TIDAL combined with a reverse objective is counterproductive "
                "(docs/method.md §7.5); the paper's recipes use TIDAL with forward objectives only",
                UserWarning,
                stacklevel=2,
            )

    @property
    def pipeline(self) -> Pipeline | None:
        """A for chunk-level terms, B for token-level terms, None for CE only (no teacher)."""
        if not self.terms:
            return None
        return Pipeline.A if self.terms[0].chunk_level else Pipeline.B

    @property
    def mode(self) -> str:
        """The canonical reference mode string (``"none"`` for CE only)."""
        if not self.terms:
            return "none"
        suffix = "_aligned" if self.aligned else ""
        return "+".join(term.mode + suffix for term in self.terms)

    @property
    def loss_terms(self) -> tuple[str, ...]:
        """Names of the logged loss terms, CE first: e.g. ``("ce", "calm_rev")``, ``("ce", "tidal", "kl")``."""
        return ("ce",) + tuple(term.name for term in self.terms)

    @property
    def uses_tidal(self) -> bool:
        """A TIDAL term is present: the step needs lambda (logged as ``lambda_train``)."""
        return any(term.uses_tidal for term in self.terms)

    @property
    def uses_chunks(self) -> bool:
        """Chunk alignment, chunk-consistent masking and teacher token log-probs are needed (pipeline A)."""
        return self.pipeline is Pipeline.A


def _suggest(value: str, choices: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(value, choices, n=1, cutoff=0.4)
    return f"; did you mean {close[0]!r}?" if close else ""


def _mode_error(mode: str, reason: str, bad: str | None) -> ConfigError:
    hint = _suggest(bad, MODES) if bad else ""
    return ConfigError(f"distill.mode={mode!r} is not valid: {reason}; {_VALID_MODES_TEXT}{hint}")


def parse_mode(mode: str, *, comp_demo: bool = False) -> ObjectiveSpec:
    """Parse a reference ``distill_mode`` string (docs/method.md §9.1) into an :class:`ObjectiveSpec`.

    Whitespace around ``+`` parts is ignored. Raises ConfigError naming ``distill.mode``, the value,
    the valid choices and the closest valid mode.
    """
    parts = [part.strip() for part in mode.split("+")]
    if not all(parts):
        raise _mode_error(mode, "empty part", mode.replace("+", ""))
    aligned_flags = {part.endswith("_aligned") for part in parts}
    if len(aligned_flags) > 1:
        raise _mode_error(mode, "mix of _aligned and plain parts (one teacher forward serves every part)", parts[0])
    aligned = aligned_flags.pop()
    names = [part.removesuffix("_aligned") for part in parts]
    for part, name in zip(parts, names):
        if name in _CHUNK_PARTS:
            if aligned:
                raise _mode_error(mode, f"{part!r}: CALM modes have no _aligned form (chunks already align)", name)
            if len(parts) > 1:
                raise _mode_error(mode, f"{part!r}: ALM modes cannot be composed", None)
        elif name not in _TOKEN_PARTS:
            raise _mode_error(mode, f"unknown mode {part!r}", part)
    if len(set(names)) != len(names):
        raise _mode_error(mode, "a part appears twice", None)
    terms = tuple(LossTerm(*_MODE_TERMS[name]) for name in names)
    return ObjectiveSpec(terms=terms, aligned=aligned, comp_demo=comp_demo)


#: docs/method.md §9.3: preset -> {pipeline: (mode, CompDemo)}.
_PRESET_MODES: dict[str, dict[Pipeline, tuple[str, bool]]] = {
    "calm": {Pipeline.A: ("alm", False)},
    "kl": {Pipeline.B: ("kl_aligned", False)},
    "tide_cross": {Pipeline.A: ("reverse_alm", False), Pipeline.B: ("reverse_kl_aligned", False)},
    "tide_shared": {Pipeline.A: ("alm_taid", True), Pipeline.B: ("taid_aligned", True)},
}


def preset_pipelines(preset: str) -> tuple[str, ...]:
    """The pipelines ``preset`` exists for (``("A", "B")`` for ``none`` and the two TIDE presets)."""
    if preset == "none":
        return ("A", "B")
    if preset not in _PRESET_MODES:
        raise ConfigError(f"distill.preset={preset!r} is not one of {list(PRESETS)}{_suggest(preset, PRESETS)}")
    return tuple(p.value for p in _PRESET_MODES[preset])


def preset_objective(preset: str, *, pipeline: Pipeline | str | None = None) -> ObjectiveSpec:
    """The paper variant ``preset`` (docs/method.md §9.3) for ``pipeline`` (``Pipeline`` or "A"/"B").

    ``none``: CE only (any pipeline). ``calm``: CALM (A only). ``kl``: forward KL on aligned rows (B only).
    ``tide_cross``: Reverse CALM (A) / reverse KL aligned (B). ``tide_shared``: TIDAL + CompDemo, chunk
    TIDAL ``alm_taid`` (A) / ``taid_aligned`` (B). ``calm`` and ``kl`` imply their pipeline; the two
    TIDE presets need it. Raises ConfigError naming ``distill.preset`` on an unknown preset or a preset
    the pipeline cannot run.
    """
    if preset not in PRESETS:
        raise ConfigError(f"distill.preset={preset!r} is not one of {list(PRESETS)}{_suggest(preset, PRESETS)}")
    if isinstance(pipeline, str):
        try:
            pipeline = Pipeline(pipeline.upper())
        except ValueError:
            raise ConfigError(f"pipeline={pipeline!r} is not one of ['A', 'B']") from None
    if preset == "none":
        return ObjectiveSpec()
    by_pipeline = _PRESET_MODES[preset]
    if pipeline is None:
        if len(by_pipeline) > 1:
            raise ConfigError(
                f"distill.preset={preset!r} exists for pipelines A and B; choose one with --distill.pipeline=A "
                "(cross tokenizer) or --distill.pipeline=B (shared tokenizer)"
            )
        (pipeline,) = by_pipeline
    if pipeline not in by_pipeline:
        (other,) = by_pipeline
        need = "a cross-tokenizer teacher (chunk alignment)" if other is Pipeline.A else "a shared tokenizer"
        raise ConfigError(
            f"distill.preset={preset!r} is defined for pipeline {other.value} only ({need}), not pipeline "
            f"{pipeline.value}; valid presets for pipeline {pipeline.value}: "
            f"{['none'] + [name for name, modes in _PRESET_MODES.items() if pipeline in modes]}"
        )
    mode, comp_demo = by_pipeline[pipeline]
    return parse_mode(mode, comp_demo=comp_demo)
