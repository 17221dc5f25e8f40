"""The lm-eval start-up hook (tide_ds_lm_eval.pth + _tide_ds_lm_eval.py): what the wheels hold, and what it does.

The wheel and the editable wheel are built from a copy of the sources with setuptools' PEP 517 backend (as pip
does, without installing anything); the hook's behaviour is checked in fresh interpreters. That the venv's own
``lm_eval`` console script finds tide_bd3lm is test_lm_eval_harness.py::test_lm_eval_cli_scores_match_hand_computed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HOOK_SOURCE = ROOT / "tide_ds" / "eval" / "lm_eval_startup.py"


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    src = tmp_path_factory.mktemp("src")
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("tide_ds", "kernels"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = src / "dist"
    built = {}
    for mode, hook in (("regular", "build_wheel"), ("editable", "build_editable")):  # one process each, as pip does
        code = f"import sys; from setuptools import build_meta as b; print('WHEEL', b.{hook}(sys.argv[1]))"
        proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        [line] = [x for x in proc.stdout.splitlines() if x.startswith("WHEEL ")]
        built[mode] = out / line.split()[1]
    return built


@pytest.mark.parametrize("mode", ["regular", "editable"])
def test_both_wheels_put_the_hook_at_the_top_of_site_packages(wheels, mode):
    with zipfile.ZipFile(wheels[mode]) as whl:
        names = set(whl.namelist())
        assert {"tide_ds_lm_eval.pth", "_tide_ds_lm_eval.py"} <= names, sorted(names)[:20]
        assert whl.read("tide_ds_lm_eval.pth").decode() == "import _tide_ds_lm_eval; _tide_ds_lm_eval.install()\n"
        assert whl.read("_tide_ds_lm_eval.py").decode() == HOOK_SOURCE.read_text()
        [record] = [n for n in names if n.endswith(".dist-info/RECORD")]
        listed = {line.split(",")[0] for line in whl.read(record).decode().splitlines()}
    assert {"tide_ds_lm_eval.pth", "_tide_ds_lm_eval.py"} <= listed  # so pip uninstall removes them
    assert ("tide_ds/eval/harness.py" in names) == (mode == "regular")  # the editable one maps to the checkout


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_hook_registers_lazily_and_keeps_lm_eval_models():
    pytest.importorskip("lm_eval", reason="needs the eval extra: pip install -e '.[eval]'")
    proc = _python(
        "import sys\n"
        "from tide_ds.eval import lm_eval_startup as h\n"
        "h.install(); h.install()\n"
        "assert sum(type(f).__name__ == 'LmEvalRegistryFinder' for f in sys.meta_path) == 1\n"
        "from lm_eval.api.registry import get_model, model_registry\n"
        "assert not any(type(f).__name__ == 'LmEvalRegistryFinder' for f in sys.meta_path)\n"
        "print(model_registry._objs['tide_bd3lm'], model_registry._objs['tide_teacher'])\n"
        "print('torch' in sys.modules, 'tide_ds.eval.harness' in sys.modules)\n"
        "print(get_model('dummy').__name__, get_model('tide_bd3lm').__name__)\n"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "tide_ds.eval.harness:TideBD3LM tide_ds.eval.teacher_harness:TideTeacher"
    assert lines[1] == "False False"  # registering imports neither torch nor the model classes
    assert lines[2] == "DummyLM TideBD3LM"


def test_hook_is_inert_without_lm_eval():
    proc = _python(
        "import sys\n"
        "sys.modules['lm_eval'] = None  # as if lm-eval were not installed\n"
        "from tide_ds.eval import lm_eval_startup as h\n"
        "h.install()\n"
        "import json, email.message\n"
        "try:\n"
        "    import lm_eval.api.registry\n"
        "except ImportError as err:\n"
        "    print(type(err).__name__)\n"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["ModuleNotFoundError"]
