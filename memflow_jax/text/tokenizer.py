"""The UMT5 tokenizer of Wan2.1 (``google/umt5-xxl`` folder), without torch, transformers or network.

Reads ``tokenizer.json`` with the ``tokenizers`` package; when a folder has no ``tokenizer.json`` it falls
back to ``spiece.model`` with ``sentencepiece`` (same ids on the fixture cases). Reproduces the reference's
``HuggingfaceTokenizer(clean='whitespace', seq_len=text_len)`` call: clean, append ``</s>`` (no BOS),
truncate keeping room for ``</s>``, pad right with ``<pad>`` to ``text_len``, mask 1 on real tokens.
"""
from __future__ import annotations

import html
import json
import os
import re
from typing import Any, Sequence

import numpy as np

FAST_FILE = "tokenizer.json"
SPM_FILE = "spiece.model"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_MAP_FILE = "special_tokens_map.json"

# The reference collapses runs of `regex`'s \s, i.e. the Unicode White_Space property. Python's `re` \s also
# matches U+001C..U+001F, so spell the White_Space set out instead.
_WHITESPACE_RUN = re.compile("[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")


class TokenizerError(ValueError):
    """A tokenizer folder that cannot be loaded, or bad tokenizer input."""


def clean_text(text: str) -> str:
    """Reference ``clean='whitespace'``: ftfy.fix_text, html.unescape twice, strip, collapse whitespace, strip."""
    import ftfy

    if not isinstance(text, str):
        raise TokenizerError(f"prompts must be str, got {type(text).__name__}")
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()  # double unescape: '&amp;amp;' -> '&'
    return _WHITESPACE_RUN.sub(" ", text).strip()


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_name(value: Any, default: str) -> str:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else default


class _FastBackend:
    def __init__(self, path: str):
        from tokenizers import Tokenizer

        try:
            self.tok = Tokenizer.from_file(path)
        except Exception as e:  # corrupt / foreign json
            raise TokenizerError(f"{path}: cannot be loaded by the `tokenizers` package ({e})") from None
        self.tok.no_truncation()
        self.tok.no_padding()

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    @property
    def size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]


class _SentencePieceBackend:
    """spiece.model + the added tokens of ``tokenizer_config.json`` (``<extra_id_k>`` appended in reverse order)."""

    def __init__(self, folder: str):
        import sentencepiece as spm

        path = os.path.join(folder, SPM_FILE)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=path)
        except Exception as e:
            raise TokenizerError(f"{path}: cannot be loaded by sentencepiece ({e})") from None
        cfg = _read_json(os.path.join(folder, CONFIG_FILE))
        smap = _read_json(os.path.join(folder, SPECIAL_MAP_FILE))
        n_sp = self.sp.get_piece_size()
        # content -> (id, lstrip, rstrip)
        self.added: dict[str, tuple[int, bool, bool]] = {}
        decoder = cfg.get("added_tokens_decoder")
        if isinstance(decoder, dict) and decoder:
            for idx, tok in decoder.items():
                self.added[tok["content"]] = (int(idx), bool(tok.get("lstrip")), bool(tok.get("rstrip")))
        else:
            n_extra = int(cfg.get("extra_ids", len(smap.get("additional_special_tokens", []))))
            for k in range(n_extra):
                self.added[f"<extra_id_{k}>"] = (n_sp + n_extra - 1 - k, True, True)
        for name in ("pad_token", "eos_token", "unk_token", "bos_token"):
            content = _token_name(smap.get(name, cfg.get(name)), "")
            if content and content not in self.added and self.sp.piece_to_id(content) != self.sp.unk_id():
                self.added[content] = (self.sp.piece_to_id(content), False, False)
        self._size = max([n_sp] + [i + 1 for i, _, _ in self.added.values()])
        alts = sorted(self.added, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, alts)) + ")") if alts else None

    def token_id(self, token: str) -> int | None:
        if token in self.added:
            return self.added[token][0]
        i = self.sp.piece_to_id(token)
        return None if (i == self.sp.unk_id() and token != self.sp.id_to_piece(i)) else i

    @property
    def size(self) -> int:
        return self._size

    def _encode_one(self, text: str) -> list[int]:
        if self._split is None:
            return list(self.sp.encode(text))
        parts = self._split.split(text)  # even: plain text, odd: added tokens
        for j in range(1, len(parts), 2):
            _, lstrip, rstrip = self.added[parts[j]]
            if lstrip:
                parts[j - 1] = parts[j - 1].rstrip()
            if rstrip:
                parts[j + 1] = parts[j + 1].lstrip()
        ids: list[int] = []
        for j, part in enumerate(parts):
            if j % 2:
                ids.append(self.added[part][0])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [self._encode_one(t) for t in texts]


class UMT5Tokenizer:
    """Tokenizer of a ``google/umt5-xxl`` folder: ``tok(prompts) -> (ids [B, text_len], mask [B, text_len])``."""

    def __init__(self, folder: str, text_len: int):
        if text_len < 1:
            raise TokenizerError(f"text_len={text_len} must be >= 1 (room for </s>)")
        if not os.path.isdir(folder):
            raise TokenizerError(
                f"tokenizer folder {folder!r} does not exist: pass the google/umt5-xxl folder of the Wan2.1 "
                f"release (e.g. Wan2.1-T2V-1.3B/google/umt5-xxl) with {FAST_FILE} or {SPM_FILE}")
        self.folder = folder
        self.text_len = int(text_len)
        if os.path.isfile(os.path.join(folder, FAST_FILE)):
            self.backend: Any = _FastBackend(os.path.join(folder, FAST_FILE))
        elif os.path.isfile(os.path.join(folder, SPM_FILE)):
            self.backend = _SentencePieceBackend(folder)
        else:
            has = sorted(os.listdir(folder))
            raise TokenizerError(
                f"tokenizer folder {folder!r} has neither {FAST_FILE} nor {SPM_FILE} (it has {has[:10]}); "
                f"copy the google/umt5-xxl folder of the Wan2.1 release ({FAST_FILE}, {SPM_FILE}, "
                f"{CONFIG_FILE}, {SPECIAL_MAP_FILE})")
        smap = _read_json(os.path.join(folder, SPECIAL_MAP_FILE))
        cfg = _read_json(os.path.join(folder, CONFIG_FILE))
        self.eos_id = self._special_id(_token_name(smap.get("eos_token", cfg.get("eos_token")), "</s>"))
        self.pad_id = self._special_id(_token_name(smap.get("pad_token", cfg.get("pad_token")), "<pad>"))

    def _special_id(self, token: str) -> int:
        i = self.backend.token_id(token)
        if i is None:
            raise TokenizerError(f"tokenizer in {self.folder!r} has no token {token!r}; is it a umt5/T5 tokenizer?")
        return int(i)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (pieces + added tokens); must be <= text.vocab_size."""
        return int(self.backend.size)

    @staticmethod
    def clean(text: str) -> str:
        return clean_text(text)

    def encode_cleaned(self, cleaned: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Already cleaned texts -> ``(ids, mask)``, both ``[B, text_len]`` int32."""
        cleaned = list(cleaned)
        n = self.text_len
        ids = np.full((len(cleaned), n), self.pad_id, np.int32)
        mask = np.zeros((len(cleaned), n), np.int32)
        for row, toks in enumerate(self.backend.encode(cleaned) if cleaned else []):
            toks = list(toks[: n - 1]) + [self.eos_id]  # truncation keeps room for </s>
            ids[row, : len(toks)] = toks
            mask[row, : len(toks)] = 1
        return ids, mask

    def __call__(self, prompts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Raw prompts -> cleaned -> ``(ids [B, text_len] int32, mask [B, text_len] int32)``."""
        if isinstance(prompts, str):
            prompts = [prompts]
        return self.encode_cleaned([clean_text(p) for p in prompts])
