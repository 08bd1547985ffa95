"""mtbert: multitask fine-tuning of one shared BERT encoder.

`mtbert.load(RUN_DIR)` opens a trained model for raw text: `.predict(task, texts_or_pairs)`,
`.embed(texts)`, `.tasks` (see mtbert.inference.api)."""
__version__ = "0.1.0"

from mtbert.inference.api import Model, load  # noqa: E402,F401
