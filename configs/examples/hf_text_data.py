"""Build the Hugging Face example's inputs offline: a tiny BERT model folder and a text Parquet.

    python configs/examples/hf_text_data.py /tmp/hf_text
    # -> /tmp/hf_text/model/ (config.json, model.safetensors, tokenizer.json, ...) and /tmp/hf_text/docs.parquet

The text is real: the first sentence of the docstring of every public function in eight modules of
Python's standard library (math, os.path, random, json, shutil, string, textwrap, statistics), with
``label`` = 1 for the numeric modules (math, random, statistics), else 0, and a seeded
train/val/test split. The model is a random 2-layer BERT (hidden 32) with a WordPiece tokenizer
trained on those sentences, saved with ``save_pretrained``: the same files a real model folder holds.
No model hub is contacted.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

MODULES = ("math", "os.path", "random", "json", "shutil", "string", "textwrap", "statistics")
NUMERIC = {"math", "random", "statistics"}


def sentences() -> tuple[list[str], list[int], list[str]]:
    """(texts, labels, module names): one docstring first sentence per public function, deduplicated."""
    texts, labels, where, seen = [], [], [], set()
    for name in MODULES:
        mod = importlib.import_module(name)
        for attr in sorted(dir(mod)):
            fn = getattr(mod, attr)
            if attr.startswith("_") or not callable(fn) or inspect.isclass(fn):
                continue
            doc = " ".join((inspect.getdoc(fn) or "").split())
            first = doc.split(". ")[0].strip().rstrip(".")
            if len(first) < 12 or first in seen or "(" in first[:len(attr) + 1]:
                continue
            seen.add(first)
            texts.append(first)
            labels.append(int(name in NUMERIC))
            where.append(name)
    return texts, labels, where


def make_tokenizer(texts: list[str], *, max_length: int = 128, vocab_size: int = 400) -> object:
    """A WordPiece tokenizer (BERT-style [CLS] ... [SEP]) trained on ``texts`` with the tokenizers library."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=max_length)


def make_model_folder(folder: Path, texts: list[str], *, seed: int = 0, layers: int = 2, hidden: int = 32,
                      max_length: int = 128) -> Path:
    """config.json + model.safetensors of a random BertModel, and the tokenizer's files, in ``folder``."""
    import torch
    from transformers import BertConfig, BertModel

    folder = Path(folder)
    tok = make_tokenizer(texts, max_length=max_length)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=max_length, pad_token_id=tok.pad_token_id)
    BertModel(config).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_parquet(path: Path, texts: list[str], labels: list[int], *, seed: int = 0) -> Path:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    split = np.array(["train", "val", "test"])[rng.choice(3, size=len(texts), p=[0.6, 0.2, 0.2])]
    pq.write_table(pa.table({"doc_id": np.arange(len(texts), dtype=np.int64), "sentence": texts,
                             "label": np.asarray(labels, dtype=np.int64), "split": split.tolist()}), path)
    return path


def main(out: Path) -> None:
    texts, labels, _ = sentences()
    out.mkdir(parents=True, exist_ok=True)
    make_model_folder(out / "model", texts)
    write_parquet(out / "docs.parquet", texts, labels)
    print(f"{len(texts)} sentences -> {out / 'docs.parquet'}; model folder {out / 'model'}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "hf_text"))
