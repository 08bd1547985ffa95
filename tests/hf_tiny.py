"""Tiny random-initialised Hugging Face checkpoints of each encoder family, built in the test:
config.json + model.safetensors from transformers' own model classes, and a small tokenizer.json
trained on a few SST sentences (RoBERTa: byte-level BPE; MPNet: WordPiece with <s>/</s> specials;
both with RoBERTa's pair post-processor, as the real ones have)."""
from __future__ import annotations

from pathlib import Path

import torch

SIZE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
SPECIALS = {"roberta": ["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
            "mpnet": ["<s>", "<pad>", "</s>", "<unk>", "[UNK]", "<mask>"]}
VOCAB = 400


def hf_model(family: str, seed: int = 0, vocab_size: int = VOCAB, max_positions: int = 130, scale: float = 0.2):
    """A random transformers model of `family`; weights drawn wider than the init so that
    differences between implementations are not hidden by near-zero values."""
    import transformers
    extra = {"bert": dict(type_vocab_size=2, pad_token_id=0, max_position_embeddings=max_positions),
             "roberta": dict(type_vocab_size=1, pad_token_id=1, max_position_embeddings=max_positions + 2,
                             layer_norm_eps=1e-5),
             "mpnet": dict(pad_token_id=1, max_position_embeddings=max_positions + 2, layer_norm_eps=1e-5)}[family]
    cls = {"bert": (transformers.BertConfig, transformers.BertModel),
           "roberta": (transformers.RobertaConfig, transformers.RobertaModel),
           "mpnet": (transformers.MPNetConfig, transformers.MPNetModel)}[family]
    torch.manual_seed(seed)
    model = cls[1](cls[0](vocab_size=vocab_size, **SIZE, **extra)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, scale)
    return model


def tiny_tokenizer(family: str, texts: list[str]):
    """A `tokenizers` Tokenizer in the family's format (ids 0..3: <s>, <pad>, </s>, <unk>)."""
    from tokenizers.implementations import BertWordPieceTokenizer, ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing
    if family == "roberta":
        t = ByteLevelBPETokenizer()
    else:
        t = BertWordPieceTokenizer(unk_token="[UNK]", lowercase=True)
    t.train_from_iterator(texts, vocab_size=VOCAB, special_tokens=SPECIALS[family], show_progress=False)
    tok = t._tokenizer
    tok.post_processor = RobertaProcessing(("</s>", 2), ("<s>", 0))
    return tok


def sst_texts(data_dir: Path, n: int = 300) -> list[str]:
    lines = (Path(data_dir) / "ids-sst-train.csv").read_text().splitlines()[1: n + 1]
    return [line.split("\t")[2] for line in lines]


def write_hf_dir(path: Path, family: str, data_dir: Path, seed: int = 0) -> Path:
    """A Hugging Face checkpoint directory of a tiny RoBERTa or MPNet with its tokenizer."""
    path.mkdir(parents=True, exist_ok=True)
    hf_model(family, seed).save_pretrained(str(path))
    tiny_tokenizer(family, sst_texts(data_dir)).save(str(path / "tokenizer.json"))
    return path
