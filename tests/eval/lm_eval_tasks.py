"""Shared by the lm-eval tests: the local multiple-choice task (YAML over JSONL) and a bare lm-eval request."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Sequence
from pathlib import Path

#: (context, choices): the documents of the local multiple-choice tasks
MC_DOCS = [
    ("The sky is", ["blue", "green", "made of cheese"]),
    ("Two plus two equals", ["four", "five"]),
    ("Water boils at", ["100 degrees", "0 degrees", "a low price"]),
]


class Req:
    """What lm-eval hands a model: an object with ``args``."""

    def __init__(self, *args):
        self.args = args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_mc_task(d: Path, task: str, lls_of: Callable[[str, Sequence[str]], list[float]]) -> None:
    """Write ``task`` over MC_DOCS into ``d``; the label is the highest-likelihood choice (``lls_of(context,
    choices)``, computed by the caller by hand) for the first two documents and another one for the third, so
    the right accuracy is 2/3."""
    with open(d / f"{task}.jsonl", "w") as fh:
        for i, (context, choices) in enumerate(MC_DOCS):
            lls = lls_of(context, choices)
            best = max(range(len(choices)), key=lls.__getitem__)
            label = best if i < 2 else (best + 1) % len(choices)
            fh.write(json.dumps({"question": context, "choices": choices, "label": label}) + "\n")
    (d / f"{task}.yaml").write_text(f"""\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / f'{task}.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
