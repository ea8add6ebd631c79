"""CLIP-format byte-level BPE vocabularies written from a word list.

The shipped mini model's tokenizer and the tests' tiny tokenizers are written here, in
CLIP's format (byte-level symbols, ``</w>`` marks the end of a word).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from difflab.io import PathLike


def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable-character table of byte-level BPE (GPT-2/CLIP)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _bpe(word: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word's symbols: merge the lowest-ranked adjacent pair
    until no pair has a merge (the rule CLIP's tokenizer applies)."""
    word = list(word)
    while len(word) > 1:
        known = [(ranks[p], i) for i, p in enumerate(zip(word, word[1:])) if p in ranks]
        if not known:
            break
        _, first = min(known)
        a, b = word[first], word[first + 1]
        merged, i = [], 0
        while i < len(word):
            if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                merged.append(a + b)
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = merged
    return word


def write_clip_vocab(folder: PathLike, words: Iterable[str]) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of a CLIP-format BPE over ``words``.

    Each word first gets what the merges so far make of it, then new merges that join
    those pieces left to right; later merges rank after earlier ones, so every listed
    word encodes to one token. Other text falls back to shorter pieces.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    seen = set(vocab)
    for word in words:
        if len(word) < 2:
            continue
        pieces = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        cur = pieces[0]
        for nxt in pieces[1:]:
            pair, merged = (cur, nxt), cur + nxt
            if pair not in ranks:
                ranks[pair] = len(merges)
                merges.append(pair)
            if merged not in seen:
                vocab.append(merged)
                seen.add(merged)
            cur = merged
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return folder
