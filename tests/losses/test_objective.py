import dataclasses
import warnings

import pytest

from tide_ds.losses.objective import (
    MODES,
    PRESETS,
    LossTerm,
    ObjectiveSpec,
    Pipeline,
    TermKind,
    parse_mode,
    preset_objective,
)

A, B = Pipeline.A, Pipeline.B
CALM, CHUNK_TIDAL, KL, TIDAL = TermKind.CALM, TermKind.CHUNK_TIDAL, TermKind.KL, TermKind.TIDAL

# mode -> (pipeline, [(kind, reverse)], aligned, logged loss terms)
VALID = {
    "alm": (A, [(CALM, False)], False, ("ce", "calm")),
    "reverse_alm": (A, [(CALM, True)], False, ("ce", "calm_rev")),
    "alm_taid": (A, [(CHUNK_TIDAL, False)], False, ("ce", "calm_tidal")),
    "reverse_alm_taid": (A, [(CHUNK_TIDAL, True)], False, ("ce", "calm_tidal_rev")),
    "kl": (B, [(KL, False)], False, ("ce", "kl")),
    "reverse_kl": (B, [(KL, True)], False, ("ce", "kl_rev")),
    "taid": (B, [(TIDAL, False)], False, ("ce", "tidal")),
    "kl_aligned": (B, [(KL, False)], True, ("ce", "kl")),
    "reverse_kl_aligned": (B, [(KL, True)], True, ("ce", "kl_rev")),
    "taid_aligned": (B, [(TIDAL, False)], True, ("ce", "tidal")),
    "kl+taid": (B, [(KL, False), (TIDAL, False)], False, ("ce", "kl", "tidal")),
    "kl+reverse_kl": (B, [(KL, False), (KL, True)], False, ("ce", "kl", "kl_rev")),
    "taid_aligned+kl_aligned": (B, [(TIDAL, False), (KL, False)], True, ("ce", "tidal", "kl")),
    "kl_aligned+reverse_kl_aligned": (B, [(KL, False), (KL, True)], True, ("ce", "kl", "kl_rev")),
    "reverse_kl+taid": (B, [(KL, True), (TIDAL, False)], False, ("ce", "kl_rev", "tidal")),
}
WARNS = {"reverse_alm_taid", "reverse_kl+taid"}


@pytest.mark.parametrize("mode", list(VALID))
def test_parse_mode_every_spec_string(mode):
    pipeline, terms, aligned, loss_terms = VALID[mode]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if mode in WARNS else "error")
        spec = parse_mode(mode)
    assert spec.pipeline is pipeline
    assert [(t.kind, t.reverse) for t in spec.terms] == terms
    assert spec.aligned is aligned and spec.comp_demo is False
    assert spec.loss_terms == loss_terms
    assert spec.mode == mode  # canonical form round-trips
    assert spec.uses_chunks is (pipeline is A)
    assert spec.uses_tidal is any(kind in (TIDAL, CHUNK_TIDAL) for kind, _ in terms)


def test_modes_constant_lists_every_single_mode():
    assert set(MODES) == {m for m in VALID if "+" not in m}


def test_parse_mode_ignores_whitespace_and_keeps_comp_demo():
    spec = parse_mode(" taid_aligned + kl_aligned ", comp_demo=True)
    assert spec.mode == "taid_aligned+kl_aligned" and spec.comp_demo


@pytest.mark.parametrize(
    "mode,needles",
    [
        ("alm_aligned", ["'alm_aligned'", "CALM modes have no _aligned form", "did you mean 'alm'"]),
        ("alm+kl", ["'alm': ALM modes cannot be composed"]),
        ("kl+reverse_alm", ["'reverse_alm': ALM modes cannot be composed"]),
        ("alm+reverse_alm", ["ALM modes cannot be composed"]),
        ("taid_aligned+alm", ["mix of _aligned and plain parts"]),
        ("kl_aligned+taid", ["mix of _aligned and plain parts"]),
        ("kl+kl", ["a part appears twice"]),
        ("klx", ["unknown mode 'klx'", "did you mean 'kl'"]),
        ("reverse_taid", ["unknown mode 'reverse_taid'"]),
        ("reverse_alm_tiad", ["unknown mode", "did you mean 'reverse_alm_taid'"]),
        ("kl+", ["empty part"]),
        ("", ["empty part"]),
        ("none", ["unknown mode 'none'"]),
    ],
)
def test_parse_mode_rejects_invalid_strings_with_reason(mode, needles):
    with pytest.raises(ValueError) as err:
        parse_mode(mode)
    message = str(err.value)
    assert message.startswith(f"distill.mode={mode!r} is not valid")
    assert "valid modes are ['alm', 'reverse_alm'" in message
    for needle in needles:
        assert needle in message


def test_tidal_with_reverse_objective_warns():
    with pytest.warns(UserWarning, match=r"distill.mode='reverse_alm_taid'.*counterproductive.*docs/method.md §7.5"):
        parse_mode("reverse_alm_taid")
    with pytest.warns(UserWarning, match="TIDAL combined with a reverse objective"):
        parse_mode("taid_aligned+reverse_kl_aligned")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse_mode("alm_taid")
        parse_mode("taid_aligned")
        parse_mode("reverse_alm")


# preset -> {pipeline: (mode, comp_demo)} per docs/method.md §9.3
PAPER = {
    ("calm", A): ("alm", False),
    ("kl", B): ("kl_aligned", False),
    ("tide_cross", A): ("reverse_alm", False),
    ("tide_cross", B): ("reverse_kl_aligned", False),
    ("tide_shared", A): ("alm_taid", True),
    ("tide_shared", B): ("taid_aligned", True),
}


@pytest.mark.parametrize("preset,pipeline", list(PAPER), ids=[f"{p}-{q.value}" for p, q in PAPER])
def test_presets_map_to_section_9_3(preset, pipeline):
    mode, comp_demo = PAPER[(preset, pipeline)]
    spec = preset_objective(preset, pipeline=pipeline)
    assert spec.mode == mode and spec.comp_demo is comp_demo and spec.pipeline is pipeline
    assert spec == parse_mode(mode, comp_demo=comp_demo)
    assert preset_objective(preset, pipeline=pipeline.value.lower()) == spec


def test_preset_none_is_ce_only_on_any_pipeline():
    for pipeline in (None, A, B, "b"):
        spec = preset_objective("none", pipeline=pipeline)
        assert spec.terms == () and spec.pipeline is None and spec.loss_terms == ("ce",) and spec.mode == "none"
    assert set(PRESETS) == {"none"} | {p for p, _ in PAPER}


def test_single_pipeline_presets_imply_their_pipeline():
    assert preset_objective("calm").pipeline is A
    assert preset_objective("kl").pipeline is B


@pytest.mark.parametrize(
    "preset,pipeline,needles",
    [
        (
            "kl",
            A,
            [
                "distill.preset='kl' is defined for pipeline B only",
                "not pipeline A",
                "valid presets for pipeline A: ['none', 'calm', 'tide_cross', 'tide_shared']",
            ],
        ),
        (
            "calm",
            B,
            [
                "distill.preset='calm' is defined for pipeline A only",
                "cross-tokenizer",
                "['none', 'kl', 'tide_cross', 'tide_shared']",
            ],
        ),
        ("tide_cross", None, ["distill.preset='tide_cross' exists for pipelines A and B; choose one with --distill.pipeline=A"]),
        ("tide_shraed", A, ["distill.preset='tide_shraed' is not one of", "did you mean 'tide_shared'"]),
        ("reverse_alm", A, ["distill.preset='reverse_alm' is not one of ['none'"]),
        ("calm", "C", ["pipeline='C' is not one of ['A', 'B']"]),
    ],
)
def test_presets_reject_invalid_combinations_with_reason(preset, pipeline, needles):
    with pytest.raises(ValueError) as err:
        preset_objective(preset, pipeline=pipeline)
    for needle in needles:
        assert needle in str(err.value)


def test_objective_spec_is_frozen_and_validates_direct_construction():
    spec = parse_mode("reverse_alm")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.aligned = True  # type: ignore[misc]
    with pytest.raises(ValueError, match="cannot be combined"):
        ObjectiveSpec(terms=(LossTerm(CALM), LossTerm(KL)))
    with pytest.raises(ValueError, match="ALM modes cannot be composed"):
        ObjectiveSpec(terms=(LossTerm(CALM), LossTerm(CALM, reverse=True)))
    with pytest.raises(ValueError, match="_aligned applies to pipeline-B token terms only"):
        ObjectiveSpec(terms=(LossTerm(CALM, reverse=True),), aligned=True)
    with pytest.raises(ValueError, match="distill.comp_demo=True needs a distillation term"):
        ObjectiveSpec(comp_demo=True)
    with pytest.raises(ValueError, match="each term may appear once"):
        ObjectiveSpec(terms=(LossTerm(KL), LossTerm(KL)))
    with pytest.raises(ValueError, match="token-level TIDAL has no reverse form"):
        LossTerm(TIDAL, reverse=True)


def test_loss_term_weight_and_temperature_groups_follow_section_9_2():
    groups = {
        (CALM, False): ("calm", "calm"),
        (CALM, True): ("calm", "calm"),
        (CHUNK_TIDAL, False): ("calm", "calm"),
        (CHUNK_TIDAL, True): ("calm", "calm"),
        (KL, False): ("kl", "kl"),
        (KL, True): ("kl", "kl"),
        (TIDAL, False): ("tidal", "kl"),
    }
    for (kind, reverse), expected in groups.items():
        term = LossTerm(kind, reverse)
        assert (term.weight_group, term.temperature_group) == expected
        assert term.chunk_level is (kind in (CALM, CHUNK_TIDAL))
