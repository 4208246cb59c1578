"""CLIP tokenizer files generated locally, because no CLIP vocabulary can be downloaded.

A ``CLIPTokenizer`` needs ``vocab.json`` and ``merges.txt``. With CLIP's 256 byte symbols
(each also as an end-of-word ``</w>`` variant) and no merges, every prompt tokenizes into
characters: enough for random-weight models, which only need the shapes right.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers.convert_slow_tokenizer import bytes_to_unicode

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MERGES_HEADER = "#version: 0.2"


def byte_level_vocab() -> dict[str, int]:
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}


def write_clip_tokenizer(folder: str | Path, vocab: dict[str, int], merges: list[str],
                         model_max_length: int = 77) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("\n".join([MERGES_HEADER, *merges]) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length,
        "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS,
        "do_lower_case": True}))
    return folder


def write_byte_level_clip_tokenizer(folder: str | Path) -> Path:
    return write_clip_tokenizer(folder, byte_level_vocab(), merges=[])
