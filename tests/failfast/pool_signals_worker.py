"""Runs the preprocessing pool many times under the trainer's preemption guard (by test_child_signals.py).

usage: python pool_signals_worker.py QWEN3_DIR WORK_ROOT RUNS

Prints one ``run i ok`` line per finished pool run; a run that never ends is what the test catches.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from tide_ds.data import preprocess as pp
from tide_ds.trainer.preemption import PreemptionGuard


def main() -> None:
    qwen3, root, runs = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    data = root / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"answer {i}"}]}
            for i in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = pp.PreprocessConfig(pipeline="B", input=data, student_tokenizer=qwen3, teacher_tokenizer=qwen3,
                              out=root / "out", seq_len=64, teacher_seq_len=64, block_size=16, num_proc=2,
                              shard_size=2, heldout_fraction=0.5)
    encoder, parts = cfg.encoder(), pp._parts_of(data)
    guard = PreemptionGuard([signal.SIGTERM, signal.SIGINT, signal.SIGUSR1]).install()  # as train() does
    for i in range(runs):
        work = root / f"work{i}"
        work.mkdir()
        pp._run_shards(cfg, encoder, parts, work, [0, 1])
        assert (work / "shard-00001.json").is_file()
        print(f"run {i} ok", flush=True)
    assert guard.received is None, guard.received  # the pool's signals never reached the parent's guard


if __name__ == "__main__":
    main()
