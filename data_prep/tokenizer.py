"""Training the byte-level BPE tokenizer (HF `tokenizers`) on the text of a shard directory.

The special tokens come first, in a fixed order, so their ids are stable: <|pad|> is 0.

    msa-prep tokenizer /tmp/demo --vocab-size 4096
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_prep.reader import iter_documents
from data_prep.schema import SPECIAL_TOKENS, TOKENIZER_NAME


def _texts(docs: Iterable) -> Iterator[str]:
    for doc in docs:
        for seg in doc.segments:
            if seg.type == "text" and seg.text:
                yield seg.text


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} is smaller than the byte alphabet plus special tokens")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, f"special token {name} did not get id {i}"
    return tok


def train_tokenizer_on_shards(shards_dir: Path, vocab_size: int, out_path: Path | None = None,
                              max_documents: int | None = None) -> Path:
    tok = train_tokenizer(_texts(iter_documents(shards_dir, limit=max_documents)), vocab_size)
    out_path = Path(out_path or Path(shards_dir) / TOKENIZER_NAME)
    tok.save(str(out_path))
    return out_path


def load_tokenizer(path: Path) -> Tokenizer:
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path}: no tokenizer; run `msa-prep tokenizer SHARDS_DIR` first")
    tok = Tokenizer.from_file(str(path))
    for i, name in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(name) != i:
            raise ValueError(f"{path}: special token {name} must have id {i} (got {tok.token_to_id(name)})")
    return tok
