"""mtbert: multitask fine-tuning of one shared BERT encoder.

`mtbert.load(RUN_DIR)` opens a trained model for raw text: `.predict(task, texts_or_pairs)`,
`.embed(texts)`, `.tasks` (see mtbert.inference.api)."""
__version__ = "0.1.0"

from mtbert.core.runtime import bound_kernel_caches  # noqa: E402

bound_kernel_caches()  # before any kernel runs (training memory, RESULTS.md)

from mtbert.inference.api import Model, load  # noqa: E402,F401
