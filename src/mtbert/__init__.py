"""mtbert: multitask fine-tuning of one shared BERT encoder."""
__version__ = "0.1.0"
