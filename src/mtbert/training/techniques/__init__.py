"""Training techniques from the papers, each a small plug-in chosen by name under `techniques:`
(interface: base.py; what each does, its paper and options: docs/techniques.md).

Every module in this folder is imported here, so a new technique is one new file."""
import importlib
import pkgutil

from mtbert.training.techniques.base import (  # noqa: F401
    TECHNIQUES,
    GradientCombiner,
    StepContext,
    Technique,
    build_techniques,
    gradient_combiner,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")  # registers its techniques
