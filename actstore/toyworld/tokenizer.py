"""Word-level CLIP tokenizer for the toy world's closed vocabulary.

The toy model must load through exactly the code path of a real SD folder, so the
tokenizer is a genuine ``CLIPTokenizer`` (vocab.json + merges.txt). We make it word-level
by learning BPE merges on the vocabulary itself until each word is a single symbol; the
byte symbols stay in the vocabulary so any text still tokenizes (unknown words fall apart
into characters rather than failing).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from actstore.toyworld.vocab import WORDS

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 24


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode map (needed for vocab symbols)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def learn_merges(words: Iterable[str] = WORDS) -> list[tuple[str, str]]:
    """Greedy BPE training on the word list, run until every word is one symbol."""
    b2u = bytes_to_unicode()
    segs = {}
    for w in words:
        chars = [b2u[b] for b in w.encode("utf-8")]
        chars[-1] += "</w>"
        segs[w] = chars
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in segs.values()):
        counts: Counter = Counter()
        for s in segs.values():
            for pair in zip(s, s[1:]):
                counts[pair] += 1
        best = max(counts.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        for w, s in segs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            segs[w] = out
    return merges


def write_tokenizer_files(out_dir: str | Path, words: Iterable[str] = WORDS,
                          max_length: int = MAX_LENGTH) -> Path:
    """Write vocab.json, merges.txt and the tokenizer configs for ``CLIPTokenizer``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    b2u = bytes_to_unicode()
    vocab_list = list(b2u.values()) + [c + "</w>" for c in b2u.values()]
    merges = learn_merges(words)
    for a, b in merges:
        vocab_list.append(a + b)
    vocab_list += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    cfg = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
        **special,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return out


def build_tokenizer(out_dir: str | Path, words: Sequence[str] = WORDS,
                    max_length: int = MAX_LENGTH) -> CLIPTokenizer:
    """Write the files, load them back as ``CLIPTokenizer`` and verify one token per word."""
    from transformers import CLIPTokenizer

    write_tokenizer_files(out_dir, words, max_length)
    tok = CLIPTokenizer.from_pretrained(str(out_dir))
    check_word_level(tok, words)
    return tok


def check_word_level(tok: CLIPTokenizer, words: Iterable[str] = WORDS) -> None:
    """Raise if any vocabulary word does not map to exactly one token."""
    bad = []
    for w in words:
        ids = tok(w, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            bad.append((w, tok.convert_ids_to_tokens(ids)))
    if bad:
        raise ValueError(f"words not single tokens: {bad}")
