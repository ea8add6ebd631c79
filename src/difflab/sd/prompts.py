"""Prompts -> token ids for the CLIP text encoder, with nothing dropped silently.

The text encoder reads ``L = max_position_embeddings`` ids: a start token, at most
``L - 2`` prompt tokens, an end token, then padding (77 for SD v1, 24 for the shipped
mini model). For every prompt:

- a word written like a concept token (``<new9>``) that no loaded concept has is an
  error: CLIP would spell it out in characters and the image would silently ignore it;
- a model with a *closed vocabulary* (``StableDiffusion.closed_vocabulary``: the mini
  model of ``difflab t2i``, whose text encoder saw only the words its vocabulary holds
  whole) gets the prompt without the words its vocabulary lacks, with an
  :class:`~difflab.io.InputWarning` naming them. CLIP's byte-level BPE would spell such
  a word in pieces the encoder never saw, which carry nothing for it but take up its
  few positions (the course's dog prompt spells to 49 tokens, past the mini model's
  24, and loses its concept token). Leaving the word out keeps the known words and the
  concept token in positions like those of the captions the model was trained on; a
  placeholder token instead would be another input it never saw;
- a prompt longer than ``L - 2`` tokens is cut there, as SD v1 does, with a warning
  naming the words cut; when the cut would take a concept token, it is an error that
  names the prompt (the image would be the same as without the concept).

Prompts that fit and have no unknown words get exactly the ids of
``tokenizer(prompts, padding="max_length", max_length=L, truncation=True)``.
"""
from __future__ import annotations

import re
import warnings
from typing import List, Sequence, Set, Tuple

import torch
from torch import Tensor

from difflab.io import InputWarning

CONCEPT_LIKE = re.compile(r"<[^\s<>|]+>")  # <new1>, <cat-toy>; not <|endoftext|>


def normalize(tokenizer, text: str) -> str:
    """``text`` as the tokenizer sees it before splitting (CLIP: NFC, lowercase)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    normalizer = getattr(backend, "normalizer", None)
    if normalizer is not None:
        return normalizer.normalize_str(text)
    return text.lower()


def _words(tokenizer, ids: Sequence[int], added: Set[int]) -> List[List[int]]:
    """``ids`` grouped into words: CLIP's BPE ends every word with a ``</w>`` token, and
    an added token (a concept) is a word of its own."""
    tokens = tokenizer.convert_ids_to_tokens(list(ids))
    words: List[List[int]] = []
    current: List[int] = []
    for i, t in zip(ids, tokens):
        if i in added:
            if current:
                words.append(current)
                current = []
            words.append([i])
            continue
        current.append(i)
        if t.endswith("</w>"):
            words.append(current)
            current = []
    if current:
        words.append(current)
    return words


def _text(tokenizer, word: Sequence[int]) -> str:
    return tokenizer.decode(list(word)).strip()


def _concepts(sd) -> Tuple[dict, Set[int]]:
    """(normalized concept token name -> token, ids of every concept token)."""
    if sd.concepts is None:
        return {}, set()
    names = {}
    for token, tok_names in zip(sd.concepts.tokens, sd.concepts.names):
        for n in tok_names:
            names[normalize(sd.tokenizer, n)] = token
    return names, {i for ids in sd.concepts.ids for i in ids}


def prompt_token_ids(sd, prompt: str, length: int) -> List[int]:
    """The ids of one prompt, ``[bos, ..., eos]`` before padding (see the module doc)."""
    tok = sd.tokenizer
    names, concept_ids = _concepts(sd)
    text = sd.concepts.expand_prompt(prompt) if sd.concepts is not None else prompt
    for m in CONCEPT_LIKE.findall(normalize(tok, text)):
        if m not in names:
            have = ", ".join(sorted(set(names.values()))) or "none"
            raise ValueError(f"prompt {prompt!r}: {m!r} looks like a concept token, but no embedding is loaded for it "
                             f"(loaded concepts: {have}); load its embedding or write it without angle brackets")
    ids = tok(text, add_special_tokens=False, verbose=False).input_ids  # verbose: no "longer than" notice
    added = set(tok.get_added_vocab().values())
    words = _words(tok, ids, added)
    if getattr(sd, "closed_vocabulary", False):
        unknown = [w for w in words if len(w) > 1]
        if unknown:
            warnings.warn(f"prompt {prompt!r}: the model's vocabulary has no "
                          f"{', '.join(repr(_text(tok, w)) for w in unknown)}; left out of the prompt (its text encoder "
                          "knows only the words its vocabulary holds whole)", InputWarning, stacklevel=2)
            words = [w for w in words if len(w) == 1]
    room = length - 2
    flat = [i for w in words for i in w]
    if len(flat) > room:
        lost = [i for i in flat[room:] if i in concept_ids]
        if lost:
            token = tok.convert_ids_to_tokens(lost[0])
            raise ValueError(f"prompt {prompt!r} is {len(flat)} tokens, but the text encoder reads {room} (plus start "
                             f"and end), so its concept token {token!r} would be cut off; shorten the prompt")
        cut, start = [], 0
        for w in words:
            if start + len(w) > room:
                cut.append(w)
            start += len(w)
        warnings.warn(f"prompt {prompt!r} is {len(flat)} tokens, but the text encoder reads {room}; cut: "
                      f"{' '.join(_text(tok, w) for w in cut)!r}", InputWarning, stacklevel=2)
        flat = flat[:room]
    return [tok.bos_token_id] + flat + [tok.eos_token_id]


def prompt_ids(sd, prompts: Sequence[str]) -> Tensor:
    """[B, L] token ids of ``prompts`` (L = the text encoder's max_position_embeddings),
    padded with the tokenizer's pad token; raises or warns as the module doc says."""
    length = int(sd.text_encoder.config.max_position_embeddings)
    pad = sd.tokenizer.pad_token_id
    if pad is None:
        pad = sd.tokenizer.eos_token_id
    rows = []
    for p in prompts:
        ids = prompt_token_ids(sd, p, length)
        rows.append(ids + [pad] * (length - len(ids)))
    return torch.tensor(rows, dtype=torch.long)
