"""A tiny exported student for the lm-eval and CLI tests: the layout ``python -m tide_ds.export`` writes.

Built without training (random weights from the run config's seed) with the trainer's own builders:
``config.json`` and ``model.safetensors`` (save_student), the Qwen3 tokenizer with its mask token,
``tide_ds_export.json`` (block size) and ``tide_ds_run_config.yaml``. The test of the exporter itself, on
real 2-rank runs, is test_after_training_e2e.py.
"""

from __future__ import annotations

import json
from pathlib import Path

TINY_OVERRIDES = [
    "--data.dataset=stdlib", "--distill.preset=none", "--data.seq_len=64", "--diffusion.block_size=8",
    "--model.hidden_size=32", "--model.intermediate_size=64", "--model.head_dim=16", "--model.num_layers=2",
    "--model.num_heads=2", "--model.num_kv_heads=1",
]


def build_tiny_export(out: Path) -> Path:
    from tide_ds.builders import build_student, build_tokenizer
    from tide_ds.config import build_config
    from tide_ds.data.tokenizers import load_tokenizer
    from tide_ds.models.qwen3 import save_student
    from tide_ds.sampling.load import EXPORT_RECORD, EXPORT_RUN_CONFIG

    cfg = build_config(overrides=TINY_OVERRIDES)
    tokenizer_dir, special = build_tokenizer(cfg)
    student = build_student(cfg, special=special)
    out.mkdir(parents=True)
    save_student(student, out)
    load_tokenizer(tokenizer_dir).save_pretrained(str(out))
    (out / EXPORT_RUN_CONFIG).write_text(cfg.to_yaml())
    record = {"source": "tests/eval/tiny_export.py", "step": 0, "block_size": cfg.diffusion.block_size,
              "dtype": "float32", "mask_token_id": special.mask_id}
    (out / EXPORT_RECORD).write_text(json.dumps(record) + "\n")
    return out
