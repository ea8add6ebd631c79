"""New-token embeddings in a CLIP text encoder, and embedding files.

A concept token S* gets ``num_vectors`` rows of width d, held in their own
``nn.Parameter`` and spliced into the token-embedding lookup (``ConceptEmbedding``): the
original table and every network weight stay frozen by construction.

Embedding files are safetensors mapping token -> [num_vectors, d] (the layout
diffusers' ``load_textual_inversion`` reads). A token with n > 1 vectors is expanded in
prompts to ``tok tok_1 ... tok_{n-1}`` (diffusers' naming for multi-vector tokens).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from difflab.io import PathLike, check_finite, load_tensors, save_tensors


# ------------------------------------------------------------------ the spliced lookup
class ConceptEmbedding(nn.Module):
    """A token-embedding lookup: the frozen original table plus added concept rows.

    ``base`` keeps its original rows (never given to an optimizer); each concept is one
    ``nn.Parameter`` [n, d] registered as ``concept_{k}``. Token ids of added tokens map
    to rows of these parameters; every other id reads ``base``.
    """

    def __init__(self, base: nn.Embedding):
        super().__init__()
        self.base = base
        self.tokens: List[str] = []  # concept token per parameter
        self.names: List[List[str]] = []  # tokenizer tokens per concept (tok, tok_1, ...)
        self.ids: List[List[int]] = []

    @property
    def weight(self) -> Tensor:
        """The original table (callers that inspect ``.weight`` see the frozen rows)."""
        return self.base.weight

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def concept(self, token: str) -> nn.Parameter:
        if token not in self.tokens:
            raise KeyError(f"no concept {token!r}; have {self.tokens}")
        return getattr(self, f"concept_{self.tokens.index(token)}")

    def add(self, token: str, names: List[str], ids: List[int], vectors: Tensor, trainable: bool) -> nn.Parameter:
        if vectors.ndim != 2 or vectors.shape[1] != self.embedding_dim:
            raise ValueError(f"embedding for {token!r} must be [n, {self.embedding_dim}], got {tuple(vectors.shape)}")
        param = nn.Parameter(vectors.detach().clone().to(self.base.weight), requires_grad=trainable)
        self.register_parameter(f"concept_{len(self.tokens)}", param)
        self.tokens.append(token)
        self.names.append(list(names))
        self.ids.append(list(ids))
        return param

    def expand_prompt(self, prompt: str) -> str:
        """Write each multi-vector token ``tok`` as ``tok tok_1 ... tok_{n-1}``, in any
        case (the tokenizer lowercases text, so ``<NEW1>`` is ``<new1>``)."""
        for token, names in zip(self.tokens, self.names):
            if len(names) > 1:
                prompt = re.sub(re.escape(token) + r"(?!_\d)", lambda m: " ".join(names), prompt, flags=re.IGNORECASE)
        return prompt

    def forward(self, input_ids: Tensor) -> Tensor:
        out = self.base(torch.where(input_ids < self.base.num_embeddings, input_ids, torch.zeros_like(input_ids)))
        if not self.tokens:
            return out
        table = torch.cat([getattr(self, f"concept_{k}").to(out.dtype) for k in range(len(self.tokens))])
        all_ids = torch.tensor([i for ids in self.ids for i in ids], device=input_ids.device)
        match = input_ids.unsqueeze(-1) == all_ids  # [..., K]
        is_new = match.any(-1, keepdim=True)
        rows = table[match.float().argmax(-1)]  # row of the matching new token (garbage where none)
        return torch.where(is_new, rows, out)


def concept_embedding(sd) -> ConceptEmbedding:
    """Install (once) a ConceptEmbedding as the text encoder's input embedding."""
    if sd.concepts is None:
        base = sd.text_encoder.get_input_embeddings()
        if not isinstance(base, nn.Embedding):
            raise ValueError(f"text encoder input embedding is {type(base).__name__}, expected nn.Embedding")
        emb = ConceptEmbedding(base)
        sd.text_encoder.set_input_embeddings(emb)
        sd.concepts = emb
    return sd.concepts


def check_new_token(tokenizer, names: List[str]) -> None:
    """Raise unless every name in ``names`` is new to ``tokenizer`` *as the tokenizer
    sees text*: CLIP lowercases prompts, so a token ``DIGIT`` would take over every
    "digit" of every prompt, and ``<NEW1>`` is the same token as an added ``<new1>``."""
    from difflab.sd.prompts import normalize

    vocab = tokenizer.get_vocab()
    added = {normalize(tokenizer, t): t for t in tokenizer.get_added_vocab()}
    for n in names:
        seen = normalize(tokenizer, n)
        how = "" if seen == n else f" (the tokenizer reads it as {seen!r}: it lowercases text)"
        if seen in added:
            raise ValueError(f"token {n!r} is the already added token {added[seen]!r}{how}; choose a new token name")
        if n in vocab or seen in vocab or seen + "</w>" in vocab:  # '</w>': a whole word in CLIP's BPE
            raise ValueError(f"token {n!r} is already in the tokenizer's vocabulary{how}; choose a new token name")


def token_names(token: str, num_vectors: int) -> List[str]:
    return [token] + [f"{token}_{k}" for k in range(1, num_vectors)]


def add_concept(sd, token: str, vectors: Tensor, trainable: bool = False) -> nn.Parameter:
    """Add ``token`` with embedding ``vectors`` [n, d] to the tokenizer and text encoder."""
    if not token or any(c.isspace() for c in token):
        raise ValueError(f"token must be a non-empty word without spaces, got {token!r}")
    emb = concept_embedding(sd)
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or vectors.shape[1] != emb.embedding_dim:
        raise ValueError(
            f"embedding for {token!r} has shape {tuple(vectors.shape)}; the text encoder needs width {emb.embedding_dim}"
        )
    check_finite({token: vectors}, "embedding", "token")
    names = token_names(token, vectors.shape[0])
    check_new_token(sd.tokenizer, names)
    added = sd.tokenizer.add_tokens(names)
    if added != len(names):
        raise ValueError(f"the tokenizer added {added} of the tokens {names}")
    ids = sd.tokenizer.convert_tokens_to_ids(names)
    return emb.add(token, names, ids, vectors, trainable)


def init_vectors(sd, init_word: str, num_vectors: int) -> Tensor:
    """Initial embedding: the init word's token embedding, repeated ``num_vectors`` times,
    or its tokens in order when it has exactly ``num_vectors`` tokens."""
    ids = sd.tokenizer(init_word, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"init word {init_word!r} encodes to no tokens")
    if len(ids) == 1:
        ids = ids * num_vectors
    elif len(ids) != num_vectors:
        raise ValueError(
            f"init word {init_word!r} is {len(ids)} tokens ({sd.tokenizer.convert_ids_to_tokens(ids)}); "
            f"give a one-token word or --num-vectors {len(ids)}"
        )
    base = concept_embedding(sd).base.weight
    return base[torch.tensor(ids, device=base.device)].detach().float().clone()


# ------------------------------------------------------------------------ embedding files
def save_embedding(path: PathLike, token: str, vectors: Tensor, metadata: Optional[Dict[str, str]] = None) -> None:
    """Write {token: [n, d]} as safetensors, atomically."""
    save_tensors({token: vectors.detach().float().cpu()}, path, metadata=metadata)


def read_embedding_file(path: PathLike) -> Dict[str, Tensor]:
    """token -> [n, d] float32 from one safetensors file (1-D entries become [1, d])."""
    path = Path(path)
    tensors = load_tensors(path)
    out = {}
    for token, t in tensors.items():
        if t.ndim == 1:
            t = t[None]
        if t.ndim != 2 or t.shape[0] < 1:
            raise ValueError(f"embedding file {path}: entry {token!r} has shape {tuple(t.shape)}, expected [num_vectors, width]")
        if not t.is_floating_point():
            raise ValueError(f"embedding file {path}: entry {token!r} has dtype {t.dtype}, expected floating point")
        out[token] = t.float()
    check_finite(out, f"embedding file {path}", "entry")
    if not out:
        raise ValueError(f"embedding file {path} holds no tensors")
    return out
