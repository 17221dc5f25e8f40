"""A task measure of the evidence world's students: write the held-out functions' bodies.

For the first ``n`` held-out prompts (signature + docstring, in the student's chat format), the run's final
student generates a body with the project's sampler (:func:`tide_ds.generate.complete`, BD3LM, greedy,
low-confidence remasking), and the body is scored against the real one:

* ``exact``: the generated body equals the real body (whitespace at the ends ignored);
* ``parses``: the generated body is not empty and header + body is valid Python (``ast.parse``), a low bar
  that an undertrained model fails by writing unbalanced brackets or broken indentation;
* ``similarity``: ``difflib.SequenceMatcher`` ratio of the two bodies (0 to 1), a graded measure of how
  close the text comes.

Scores are cached per run (``task.json`` beside its metrics, keyed by the prompts and sampler settings).
"""

from __future__ import annotations

import ast
import difflib
import json
import re
import textwrap
from pathlib import Path

TASK_FILE = "task.json"
_HEADER = re.compile(r"```python\n(.*)\n```", re.S)


def header_of(prompt: str) -> str:
    """The function header (signature + docstring) shown in a prompt of the instruct corpus."""
    match = _HEADER.search(prompt)
    if match is None:
        raise ValueError(f"prompt holds no ```python block: {prompt[:80]!r}")
    return match.group(1)


def parses(header: str, body: str) -> bool:
    """Whether ``header`` followed by ``body`` is valid Python (the header may be indented: dedented first)."""
    try:
        ast.parse(textwrap.dedent(header + "\n" + body.rstrip() + "\n"))
    except (SyntaxError, ValueError):
        return False
    return True


def score(header: str, reference: str, generated: str) -> dict[str, float]:
    # an empty body would parse (the docstring alone is a body): it counts as not written
    return {"exact": float(generated.strip() == reference.strip()),
            "parses": float(bool(generated.strip()) and parses(header, generated)),
            "similarity": difflib.SequenceMatcher(None, generated.strip(), reference.strip()).ratio()}


def heldout_prompts(corpus_jsonl: str | Path, *, heldout_fraction: float, n: int) -> list[tuple[str, str]]:
    """The first ``n`` held-out (prompt, body) pairs of the corpus, in corpus order."""
    from tide_ds.data.instruct_corpus import split_of_row

    pairs = []
    with open(corpus_jsonl) as fh:
        for line in fh:
            row = json.loads(line)
            if split_of_row(row, heldout_fraction=heldout_fraction) == "heldout":
                pairs.append((row["messages"][0]["content"], row["messages"][1]["content"]))
                if len(pairs) == n:
                    break
    return pairs


def measure_run(run_dir: str | Path, pairs: list[tuple[str, str]], *, max_new_tokens: int = 64,
                steps_per_block: int = 16) -> dict:
    """Generate and score a body for every prompt with the run's final student (cached in ``task.json``)."""
    import torch

    from tide_ds.generate import complete
    from tide_ds.sampling.load import load_inference_model
    from tide_ds.sampling.sampler import SamplerConfig
    from tide_ds.sampling.text import chat_prompt

    run_dir = Path(run_dir)
    key = {"prompts": len(pairs), "first": pairs[0][0][:200] if pairs else "", "max_new_tokens": max_new_tokens,
           "steps_per_block": steps_per_block}
    cache = run_dir / TASK_FILE
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return saved
    torch.set_num_threads(1)
    loaded = load_inference_model(run_dir)
    block = loaded.run_config.diffusion.block_size if loaded.run_config is not None else 32
    config = SamplerConfig(max_new_tokens=max_new_tokens, block_size=block, steps=max_new_tokens,
                           steps_per_block=steps_per_block)
    outs = complete(loaded, [chat_prompt(p) for p, _ in pairs], config=config, batch_size=16)
    scores = [score(header_of(p), body, out.text) for (p, body), out in zip(pairs, outs)]
    n = max(len(scores), 1)
    result = {"key": key, **{m: sum(s[m] for s in scores) / n for m in ("exact", "parses", "similarity")},
              "n": len(scores), "examples": [{"generated": o.text, "reference": b} for (_, b), o in
                                              zip(pairs[:3], outs[:3])]}
    cache.write_text(json.dumps(result, indent=1))
    return result
