"""Makes a plain ``lm_eval --model tide_bd3lm ...`` work: registers tide-ds's model names in lm-eval's registry.

lm-eval 0.4.13 (the version of the ``eval`` extra, the newest on PyPI) has no plugin discovery for models:
``lm_eval.api.registry.get_model`` knows only what was registered in the running process. ``pip install``
of tide-ds therefore puts two files at the top of site-packages (setup.py, ``build_lm_eval_hook``):

* ``tide_ds_lm_eval.pth``: one line, ``import _tide_ds_lm_eval; _tide_ds_lm_eval.install()``, run by
  Python's ``site`` at start-up;
* ``_tide_ds_lm_eval.py``: a copy of this file (standard library only; it does not import tide_ds, so a
  checkout on ``sys.path`` still wins over the installed package).

:func:`install` appends a finder to ``sys.meta_path`` that does nothing until ``lm_eval.api.registry`` is
imported; right after that module has run, the finder registers each name of :data:`MODELS` as lm-eval's
own lazy placeholder (``"module:Class"``, imported on first use by ``get_model``), imports
``lm_eval.models`` (lm-eval's own names: ``get_model`` imports them only into an empty registry) and
takes itself off ``sys.meta_path``. Without lm-eval the finder never fires. Start-up cost: the import of
this file and one string comparison per later import until lm-eval's registry is loaded.
"""

import sys  # nothing else at start-up (not even __future__: 80 us)

#: lm-eval model name -> ``module:class`` (lm-eval's lazy placeholder syntax)
MODELS = {
    "tide_bd3lm": "tide_ds.eval.harness:TideBD3LM",
    "tide_teacher": "tide_ds.eval.teacher_harness:TideTeacher",
}
REGISTRY_MODULE = "lm_eval.api.registry"


def register(registry_module) -> None:
    """Register :data:`MODELS` lazily in ``registry_module.model_registry`` (names already there stay)."""
    registry = getattr(registry_module, "model_registry", None)
    if registry is None:  # another lm-eval layout: ``import tide_ds.eval.harness`` still registers the class
        return
    for name, target in MODELS.items():
        if name not in registry:
            registry.register(name, target=target)
    import lm_eval.models  # noqa: F401  (lm-eval's own names; see the module docstring)


class _RegisterAfterExec:
    """The real loader of ``lm_eval.api.registry``, followed by :func:`register`."""

    def __init__(self, loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        try:
            register(module)
        except Exception as err:  # never break lm-eval itself; say why the names are missing
            print(f"tide-ds: could not register {sorted(MODELS)} with lm-eval: {err!r}", file=sys.stderr)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class LmEvalRegistryFinder:
    """A ``sys.meta_path`` finder that answers only for ``lm_eval.api.registry`` (see the module docstring)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != REGISTRY_MODULE:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)  # once: the other finders locate the module
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisterAfterExec(spec.loader)
                return spec
        return None


def install() -> None:
    """Put the finder on ``sys.meta_path`` (once), unless lm-eval's registry is already loaded."""
    if REGISTRY_MODULE in sys.modules:
        register(sys.modules[REGISTRY_MODULE])
        return
    if not any(type(f).__name__ == LmEvalRegistryFinder.__name__ for f in sys.meta_path):
        sys.meta_path.insert(0, LmEvalRegistryFinder())  # first: the path finder would answer otherwise
