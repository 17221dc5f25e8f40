"""``tide-ds``: one command for what the ``python -m tide_ds.*`` modules and ``deepspeed launch/run.py`` do.

    tide-ds train [--num_gpus N ...launcher options] [--] [--recipe FILE] [--section.field=value ...]
    tide-ds preprocess|plan|generate|eval|lm-eval|export|tokenizer ARGS...     (ARGS as the module takes them)

``tide-ds train`` runs ``deepspeed [launcher options] launch/run.py [run options]``: the same entry point
and the same options as ``deepspeed launch/run.py`` (which keeps working). Launcher options are the
DeepSpeed launcher's (``--num_gpus``, ``--num_nodes``, ``--master_port``, ...); everything after ``--`` (or
every option the launcher does not take) goes to ``launch/run.py``. ``--print-config`` and
``--help-options`` run in this process, without DeepSpeed. The launcher runs in its own process group;
SIGINT and SIGTERM sent to ``tide-ds`` are forwarded to that whole group (launcher and ranks), so no rank
is left behind, and ``tide-ds`` exits with the launcher's exit code (75 after a preemption checkpoint).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

__all__ = ["COMMANDS", "main", "run_process_group", "split_train_args"]

#: command -> (module, function taking argv, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("", "", "train through DeepSpeed (the options of launch/run.py; see tide-ds train --help)"),
    "preprocess": ("tide_ds.data.preprocess", "_main", "preprocess chat data for pipeline A or B (python -m tide_ds.data.preprocess)"),
    "plan": ("tide_ds.plan.__main__", "main", "plan a run's memory and parallelism (python -m tide_ds.plan)"),
    "generate": ("tide_ds.generate", "main", "sample from a trained student (python -m tide_ds.generate)"),
    "eval": ("tide_ds.eval.__main__", "main", "HumanEval / MBPP / GSM8K / held-out NLL, or --suite paper (python -m tide_ds.eval)"),
    "lm-eval": ("tide_ds.eval.harness", "main", "lm-evaluation-harness with the tide_bd3lm and tide_teacher models (eval extra)"),
    "export": ("tide_ds.export", "main", "export a checkpoint as a Hugging Face directory (python -m tide_ds.export)"),
    "tokenizer": ("tide_ds.data.tokenizers", "_main", "build the Qwen3 tokenizer with its mask token (python -m tide_ds.data.tokenizers)"),
}

#: DeepSpeed launcher options that take a value / that are flags (``deepspeed --help``).
_LAUNCHER_VALUED = {
    "--num_gpus", "--num_nodes", "--master_port", "--master_addr", "--hostfile", "--include", "--exclude",
    "--node_rank", "--launcher", "--launcher_args", "--min_elastic_nodes", "--max_elastic_nodes", "--ssh_port",
}
_LAUNCHER_FLAGS = {"--no_ssh", "--no_ssh_check", "--no_local_rank", "--no_python", "--force_multi", "--autotuning",
                   "--elastic_training", "--bind_cores_to_rank", "--enable_each_rank_log"}
_IN_PROCESS = {"--print-config", "--help-options"}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: tide-ds COMMAND [ARGS...]", "", (__doc__ or "").split("\n")[0], "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "tide-ds COMMAND --help shows the options of each command."]
    return "\n".join(lines)


def split_train_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """``(launcher options, launch/run.py options)``. After ``--`` everything is run.py's."""
    launcher, run = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            run += argv[i + 1:]
            break
        name = arg.split("=", 1)[0]
        if name in _LAUNCHER_VALUED:
            if "=" in arg:
                launcher.append(arg)
            elif i + 1 < len(argv):
                launcher += [arg, argv[i + 1]]
                i += 1
            else:
                raise ValueError(f"tide-ds train: {arg} needs a value, e.g. {arg} 2")
        elif name in _LAUNCHER_FLAGS:
            launcher.append(arg)
        else:
            run.append(arg)
        i += 1
    return launcher, run


def _run_script() -> Path:
    script = Path(__file__).resolve().parents[1] / "launch" / "run.py"
    if not script.is_file():
        raise FileNotFoundError(
            f"tide-ds train needs the source checkout's launch/run.py ({script} is missing); install tide-ds with "
            "pip install -e . from a clone of the repository"
        )
    return script


def run_process_group(cmd: list[str], *, env: dict[str, str] | None = None) -> int:
    """Run ``cmd`` in a new process group; SIGINT/SIGTERM to us go to the whole group. Returns its exit code."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    forwarded: list[int] = []

    def forward(signum, _frame) -> None:
        forwarded.append(signum)
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if forwarded:
        # the launcher may be gone while ranks still shut down: wait for the group to empty
        try:
            os.killpg(proc.pid, 0)
            os.killpg(proc.pid, forwarded[-1])
        except ProcessLookupError:
            pass
    return code if code >= 0 else 128 - code


def train(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        print("launch/run.py's options (tide-ds train -- --help-options lists every config field):")
        argv = ["--", "--help"]
    launcher, run = split_train_args(argv)
    script = _run_script()
    if set(run) & (_IN_PROCESS | {"-h", "--help"}):
        sys.path.insert(0, str(script.parent))
        spec = importlib.util.spec_from_file_location("tide_ds_launch_run", script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        return int(module.main(run))
    deepspeed = shutil.which("deepspeed", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if deepspeed is None:
        raise FileNotFoundError("the deepspeed launcher is not on PATH; pip install deepspeed (a dependency of tide-ds)")
    cmd = [deepspeed, *launcher, str(script), *run]
    print("tide-ds train: " + " ".join(cmd), file=sys.stderr, flush=True)
    return run_process_group(cmd)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"tide-ds: unknown command {command!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        if command == "train":
            return train(rest)
        module_name, func, _ = COMMANDS[command]
        if command == "eval" and any(a == "--suite" or a.startswith("--suite=") for a in rest):
            module_name, func = "tide_ds.eval.suite", "main"  # the paper's suite (tide_ds.eval + lm-eval)
        if importlib.util.find_spec(module_name.rsplit(".__main__", 1)[0]) is None:
            print(f"tide-ds {command}: this installation has no {module_name} (not built in this version of tide-ds)",
                  file=sys.stderr)
            return 2
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            print(f"tide-ds {command}: {err}", file=sys.stderr)
            return 2
        sys.argv = [f"tide-ds {command}", *rest]
        if command == "eval" and module_name != "tide_ds.eval.suite" and {"-h", "--help"} & set(rest):
            print("(tide-ds eval --suite paper --help: the paper's eight benchmarks through tide-ds and lm-eval)\n")
        result = getattr(module, func)(rest)
    except (ValueError, FileNotFoundError) as err:
        print(f"tide-ds {command}: error: {err}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # argparse --help / errors inside the module
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
