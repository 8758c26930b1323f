"""The output vocabulary (a recipe's ``tokenizer:``, mergekit's ``tokenizer_source`` / ``tokenizer``) and the
realignment of every input's embedding and lm_head rows to it, by token, as mergekit 0.1.5 does it.

* **The tokenizer.** ``base``: the base model's tokenizer (the first model's without a base), stripped of
  tokens whose id is past the model's embedding rows; a model: that model's tokenizer; ``union``: the base's
  (stripped), plus every other model's tokens that it lacks (as added tokens, in the models' order), plus
  every model's added tokens. The names under ``tokens:`` are added last. The output has one row per
  token, rounded up to ``pad_to_multiple_of``; ``vocab_size`` in the config says so.
* **The rows.** Each input's tensor is re-indexed to the output's tokens: a token the model has keeps the
  model's row. A token it lacks (or every token listed with ``force: true``) gets a default row: the
  ``tokens:`` entry's source when there is one; else the row of the one model that has it; else the base's,
  when the base is one of the merged inputs and has it; else the mean of the rows of the models that have
  it; zero when none has it. Padding rows are the mean of the token rows. The method then merges the
  realigned tensors as usual.

Everything here is decided while planning (tokenizers are small); the rows are moved when each embedding
tensor is read.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .checkpoints.checkpoint import Checkpoint
from .errors import OmnimergeError
from .recipe import ModelToken, TokenRow, Vocabulary, ZeroRow

log = logging.getLogger("omnimerge.vocab")
VOCAB_KEYS = ("embed.weight", "lm_head.weight")  # the tensors with one row per token


def _tokenizer_folder(ck: Checkpoint) -> Path:
    """Where a model's tokenizer lives: its folder, or for a LoRA adapter without one, its base's."""
    if any(ck.path.glob("tokenizer*")):
        return ck.path
    base = getattr(ck.source, "base", None)
    return base.path if isinstance(base, Checkpoint) else ck.path


def load_tokenizer(ck: Checkpoint):
    import transformers

    folder = _tokenizer_folder(ck)
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), use_fast=True)
    except Exception as e:  # noqa: BLE001 - whatever transformers refuses, name the folder
        raise OmnimergeError(f"{folder}: cannot load the tokenizer of '{ck.name}' ({type(e).__name__}: {e}); the "
                             "output vocabulary is built from every model's tokenizer") from None


def embedding_rows(ck: Checkpoint) -> int:
    """How many token rows the model has (its embedding's first dimension)."""
    if ck.has("embed.weight"):
        return int(ck.info("embed.weight")[1][0])
    from .checkpoints.checkpoint import text_config

    return int(text_config(ck.config).get("vocab_size") or 0)


def stripped(tokenizer, rows: int, name: str):
    """``tokenizer`` without the tokens whose id is ``rows`` or more (they have no embedding row)."""
    unused = {t for t, i in tokenizer.get_vocab().items() if i >= rows}
    if not unused:
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise OmnimergeError(f"'{name}': its tokenizer has {len(unused)} token(s) past the model's {rows} embedding "
                             "rows and no fast (tokenizers) version to remove them from")
    data = json.loads(backend.to_str())
    if data["model"]["type"] != "BPE":
        raise OmnimergeError(f"'{name}': its tokenizer ({data['model']['type']}) has {len(unused)} token(s) past the "
                             f"model's {rows} embedding rows; only BPE tokenizers can be trimmed")
    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < rows]
    for t in unused:
        data["model"]["vocab"].pop(t, None)

    def keep(m) -> bool:
        toks = m.split(" ") if isinstance(m, str) else m
        return not any(t in unused for t in toks)

    data["model"]["merges"] = [m for m in data["model"]["merges"] if keep(m)]
    from tokenizers import Tokenizer

    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(data))  # as mergekit trims it
    return tokenizer


def _copy(tokenizer):
    """A fresh copy of a tokenizer (saved and reloaded), to add tokens to."""
    import transformers

    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        return transformers.AutoTokenizer.from_pretrained(d, use_fast=True)


def _union(base_tok, tokenizers: list[tuple[Checkpoint, Any, int]]):
    """The base tokenizer plus every model's tokens it lacks, then every model's added tokens."""
    words: dict[str, None] = {}
    added: dict[str, Any] = {}
    for ck, tok, rows in tokenizers:
        special = tok.added_tokens_decoder
        for t, i in tok.get_vocab().items():
            if i < rows:
                words.setdefault(t)
        for i, info in special.items():
            if i < rows and info.content not in added:
                added[info.content] = info
            elif i < rows and added[info.content] != info:
                log.warning("note: token %r is added with different settings by several models; the first's are "
                            "kept", info.content)
    out = _copy(base_tok)
    have = base_tok.get_vocab()
    for t in words:
        if t not in added and t not in have:
            out.add_tokens(t)
    for info in added.values():
        out.add_tokens(info)
    return out


@dataclass
class OutputVocabulary:
    """The output tokenizer and, per input, the row of each output token in that input (−1: it lacks it)."""

    tokenizer: Any
    size: int  # output rows (padded)
    tokens: dict[str, int]  # output token -> id
    rows: dict[int, torch.Tensor] = field(default_factory=dict)  # id(checkpoint) -> LongTensor(len(tokens))
    own: dict[int, dict[str, int]] = field(default_factory=dict)  # id(checkpoint) -> its own vocabulary
    names: dict[int, str] = field(default_factory=dict)
    overrides: dict[str, TokenRow] = field(default_factory=dict)

    def save(self, folder: Path) -> None:
        self.tokenizer.save_pretrained(str(folder))

    def alignment(self, inputs: list[Checkpoint], base: Checkpoint | None,
                  ref: Callable[[str], Checkpoint]) -> "Alignment":
        """How one tensor's inputs (in read order) are realigned; checks the ``tokens:`` entries against them."""
        ids = [id(c) for c in inputs]
        rules: list[tuple[int, str, int, int]] = []  # (output id, kind, input position, its row or −1)
        for tok, row in self.overrides.items():
            if tok not in self.tokens:
                continue
            src = row.source
            if isinstance(src, ZeroRow):
                rules.append((self.tokens[tok], "zero", -1, -1))
                continue
            spec = src if isinstance(src, str) else src.model
            ck = ref(spec)
            if id(ck) not in ids:
                raise OmnimergeError(f"tokenizer.tokens[{tok!r}]: its source '{spec}' is not one of the models "
                                     "merged into the embeddings; name one of them")
            k = ids.index(id(ck))
            if isinstance(src, ModelToken):
                want = src.token_id if src.token_id is not None else self.own[id(ck)].get(src.token, -1)
                if want < 0 or want >= embedding_rows(ck):
                    raise OmnimergeError(f"tokenizer.tokens[{tok!r}]: '{spec}' has no token "
                                         f"{src.token if src.token is not None else src.token_id!r} with an "
                                         f"embedding row (it has {embedding_rows(ck)})")
            else:
                want = int(self.rows[id(ck)][self.tokens[tok]])
                if want < 0:
                    raise OmnimergeError(f"tokenizer.tokens[{tok!r}]: '{spec}' has no such token to take the "
                                         "row from")
            rules.append((self.tokens[tok], "row", k, want))
        base_at = ids.index(id(base)) if base is not None and id(base) in ids else None
        forced = tuple(self.tokens[t] for t, r in self.overrides.items() if r.force and t in self.tokens)
        return Alignment(self.size, len(self.tokens), torch.stack([self.rows[i] for i in ids]), base_at,
                         tuple(rules), forced)


@dataclass(frozen=True)
class Alignment:
    """Realigns one tensor's inputs (``(rows, ...)`` each, in order) to the output vocabulary of ``n`` tokens
    and ``size`` rows: ``perms[k, i]`` is input k's row of output token i (−1: it lacks it); ``rules`` the
    ``tokens:`` entries (output id, ``zero`` or ``row``, input, its row); ``forced``: ids every input takes
    the default row for."""

    size: int
    n: int
    perms: torch.Tensor
    base_at: int | None
    rules: tuple[tuple[int, str, int, int], ...]
    forced: tuple[int, ...]

    def __call__(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        n, perms = self.n, self.perms
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
        present = perms >= 0
        forced = torch.zeros(n, dtype=torch.bool)
        forced[list(self.forced)] = True
        need = (~present).any(0) | forced
        default = self._defaults(tensors, present, need, dtype)
        out = []
        for k, t in enumerate(tensors):
            new = torch.zeros((self.size, *t.shape[1:]), dtype=dtype)
            own = present[k] & ~forced
            new[:n][own] = t[perms[k][own]].to(dtype)
            fill = ~own  # lacking or forced: the default row
            if fill.any():
                new[:n][fill] = default[fill[need]]
            if self.size > n:
                new[n:] = new[:n].mean(0)
            out.append(new)
        return out

    def _defaults(self, tensors, present, need, dtype) -> torch.Tensor:
        """The default row of every token in ``need`` (rows in the order of ``need``'s True entries)."""
        idx = need.nonzero().flatten()
        shape = tensors[0].shape[1:]
        out = torch.zeros((len(idx), *shape), dtype=dtype)
        if not len(idx):
            return out
        p, have = self.perms[:, idx], present[:, idx]
        count = have.sum(0)
        total = torch.zeros_like(out)
        for k, t in enumerate(tensors):
            rows = have[k].nonzero().flatten()
            total[rows] += t[p[k, rows]].to(dtype)
        mean = total / count.clamp(min=1).reshape(-1, *([1] * len(shape))).to(dtype)
        out[count > 1] = mean[count > 1]
        if self.base_at is not None:
            by_base = (count > 1) & have[self.base_at]
            out[by_base] = tensors[self.base_at][p[self.base_at, by_base]].to(dtype)
        one = (count == 1).nonzero().flatten()
        donor = have[:, one].to(torch.int8).argmax(0)  # the one model that has the token
        for k, t in enumerate(tensors):
            rows = one[donor == k]
            out[rows] = t[p[k, rows]].to(dtype)
        at = {int(i): r for r, i in enumerate(idx.tolist())}
        for token_id, kind, k, row in self.rules:
            if token_id in at:
                out[at[token_id]] = 0 if kind == "zero" else tensors[k][row].to(dtype)
        return out


def build_vocabulary(spec: Vocabulary, base: Checkpoint | None, models: list[Checkpoint],
                     ref: Callable[[str], Checkpoint]) -> OutputVocabulary:
    """The output tokenizer and every model's rows for it (``models``: every input, base included or not)."""
    inputs = list(dict.fromkeys(([base] if base is not None else []) + models))
    first = base if base is not None else inputs[0]
    rows = {id(ck): embedding_rows(ck) for ck in inputs}
    base_tok = stripped(load_tokenizer(first), rows[id(first)], first.name)
    toks: list[tuple[Checkpoint, Any, int]] = [(first, base_tok, rows[id(first)])]
    for ck in inputs:
        if ck is not first:
            toks.append((ck, load_tokenizer(ck), rows[id(ck)]))
    if spec.source == "union":
        out = _union(base_tok, toks)
    elif spec.source == "base":
        out = _copy(base_tok)
    else:
        out = _copy(load_tokenizer(ref(spec.source)))
    existing = set(out.get_vocab())
    for t, row in spec.tokens.items():
        if row.source is None:
            raise OmnimergeError(f"tokenizer.tokens[{t!r}]: give its `source` (a model, {{kind: zero}} or "
                                 "{kind: model_token, model: ..., token: ...})")
        if t not in existing:
            out.add_tokens(t)
            existing.add(t)
    vocab = out.get_vocab()
    n = len(vocab)
    if sorted(vocab.values()) != list(range(n)):
        raise OmnimergeError(f"the output tokenizer's ids are not 0..{n - 1} (ids are missing in between); "
                             "omnimerge cannot give each token a row")
    size = n
    pad = spec.pad_to_multiple_of
    if pad and size % pad:
        size += pad - size % pad
    res = OutputVocabulary(out, size, vocab, overrides=dict(spec.tokens))
    for ck, tok, r in toks:
        own = tok.get_vocab()
        perm = torch.full((n,), -1, dtype=torch.long)
        for t, i in vocab.items():
            j = own.get(t)
            if j is not None and j < r:
                perm[i] = j
        res.rows[id(ck)] = perm
        res.own[id(ck)] = own
        res.names[id(ck)] = ck.name
    return res


def set_vocab_size(cfg: dict, size: int) -> None:
    """``vocab_size`` in the config (and its text config) for an output of ``size`` token rows."""
    from .checkpoints.checkpoint import text_config

    text = text_config(cfg)
    for c in {id(cfg): cfg, id(text): text}.values():
        if "vocab_size" in c or c is text:
            c["vocab_size"] = size
