"""The evidence task measure's scoring (tide_ds/experiments/task.py) on hand-written bodies."""

from __future__ import annotations

import pytest

from tide_ds.experiments import task

PROMPT = 'Write the body.\n\n```python\n    def area(self, r):\n        """Area of a circle."""\n```'
HEADER = '    def area(self, r):\n        """Area of a circle."""'
BODY = "        return 3.14159 * r * r"


def test_header_of_a_corpus_prompt():
    assert task.header_of(PROMPT) == HEADER
    with pytest.raises(ValueError, match="no ```python block"):
        task.header_of("no code here")


def test_scores_exact_parses_similarity():
    assert task.score(HEADER, BODY, BODY + "\n") == {"exact": 1.0, "parses": 1.0, "similarity": 1.0}
    near = task.score(HEADER, BODY, "        return 3.14 * r * r")
    assert near["exact"] == 0.0 and near["parses"] == 1.0 and 0.8 < near["similarity"] < 1.0
    broken = task.score(HEADER, BODY, "        return (3.14 * r")  # unbalanced bracket
    assert broken["parses"] == 0.0 and broken["exact"] == 0.0
    assert task.score(HEADER, BODY, "")["parses"] == 0.0  # nothing written (the docstring alone would parse)
    assert task.parses("def f():", "    pass") and not task.parses("def f():", "pass")
