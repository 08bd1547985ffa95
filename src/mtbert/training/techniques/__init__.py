"""Training techniques from the papers, each a small plug-in chosen by name under `techniques:`
(interface: base.py; what each does, its paper and options: docs/techniques.md)."""
from mtbert.training.techniques import bregman, distill, llrd, lora, pcgrad, plateau, smart, uda  # noqa: F401  (registers them)
from mtbert.training.techniques.base import (TECHNIQUES, GradientCombiner, StepContext, Technique,  # noqa: F401
                                             build_techniques, gradient_combiner)
