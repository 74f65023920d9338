"""moe-playground under one import name: `moe_playground.models`, `moe_playground.train`, `moe_playground.benchmarks`.

Installed (`pip install .`), the folders models/, train/ and benchmarks/ are subpackages of this one, so a
project with its own `models` package imports both (`python -m moe_playground.train.lm ...`).

In the checkout the folders stay where they are and both spellings work: `moe_playground.models.moe`
(this package's path includes the checkout root) and the old `models.moe`, `python -m train.lm`: the
first import of `models`, `train` or `benchmarks` under its old name calls `alias_old_spelling`, after
which each old name is the very module of the new one (one module object, one set of classes), not a copy.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from pathlib import Path

PARTS = ("models", "train", "benchmarks")

_here = Path(__file__).resolve().parent
if not (_here / "models").is_dir():  # the checkout: the folders sit beside this one
    __path__.append(str(_here.parent))


class _OldSpelling(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `train.lm` (and every other module under PARTS) as the module `moe_playground.train.lm`."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in PARTS or "." not in name:
            return None
        real = importlib.util.find_spec(f"{__name__}.{name}")
        if real is None:
            return None
        return importlib.util.spec_from_loader(name, self, origin=real.origin,
                                               is_package=real.submodule_search_locations is not None)

    def create_module(self, spec):
        return importlib.import_module(f"{__name__}.{spec.name}")

    def exec_module(self, module) -> None:
        pass  # already run under its new name

    def get_code(self, name):
        """`python -m train.lm` runs the module's code as __main__ (runpy asks for it)."""
        return importlib.util.find_spec(f"{__name__}.{name}").loader.get_code(f"{__name__}.{name}")


def alias_old_spelling(name: str) -> None:
    """Make the old top-level name `name` (one of PARTS) and its submodules the modules of `moe_playground.<name>`."""
    if not any(isinstance(f, _OldSpelling) for f in sys.meta_path):
        sys.meta_path.insert(0, _OldSpelling())
    sys.modules[name] = importlib.import_module(f"{__name__}.{name}")
