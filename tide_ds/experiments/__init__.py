"""Experiments built on the trainer: ``python -m tide_ds.experiments.evidence`` (the paper's comparison on the
demo worlds) and the aggregation/reporting it uses (:mod:`tide_ds.experiments.report`)."""
