"""Text front end: prompts -> UMT5 ``prompt_embeds`` ``[B, text_len, dim]`` with a per-prompt cache.

Equivalent of the reference's ``WanTextEncoder``: tokenizer (clean='whitespace') + encoder + padding rows
zeroed. Prompts are cached by their cleaned text, so a prompt repeated in a batch, across calls, or differing
only in whitespace / HTML escaping is encoded once. ``drop_params()`` frees the encoder's device memory once
every prompt is encoded (the sampler's ``--offload-text-encoder``); cached prompts keep working.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from memflow_jax.config import TextConfig
from memflow_jax.nn import t5 as t5_nn
from memflow_jax.text.tokenizer import TokenizerError, UMT5Tokenizer, clean_text


class TextEncoder:
    """Tokenizer + UMT5 params + config; ``encode(prompts) -> [B, text_len, dim]`` (jitted, cached).

    Args:
      tokenizer: a :class:`UMT5Tokenizer` whose ``text_len`` equals ``cfg.text_len``.
      params: encoder params (numpy or jax, float32 or bfloat16), e.g. from ``convert_t5_state_dict``.
      cfg: the ``text`` config section.
      device: put the params (and run the encoder) on this jax device; default: the default device.
      batch_size: most prompts per forward; a batch of n new prompts is padded to the next power of two
        (<= batch_size) so at most log2(batch_size) + 1 shapes are ever compiled.
    """

    def __init__(self, tokenizer: UMT5Tokenizer, params: Any, cfg: TextConfig,
                 device: jax.Device | None = None, batch_size: int = 4):
        cfg.validate()
        if tokenizer.text_len != cfg.text_len:
            raise ValueError(f"tokenizer text_len={tokenizer.text_len} != text.text_len={cfg.text_len}; "
                             "build the tokenizer with UMT5Tokenizer(folder, cfg.text_len)")
        if tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but text.vocab_size={cfg.vocab_size}; "
                             "the tokenizer folder does not belong to this encoder")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.device = device
        self.batch_size = int(batch_size)
        leaves_in = jax.tree_util.tree_leaves(params)
        self.params = jax.device_put(params, device) if device is not None else jax.device_put(params)
        # arrays we copied (and may therefore delete); arrays the caller passed through stay the caller's
        self._owned = [o for o, i in zip(jax.tree_util.tree_leaves(self.params), leaves_in) if o is not i]
        self._forward = jax.jit(lambda p, ids, mask: t5_nn.prompt_embeds(p, cfg, ids, mask))
        self._cache: dict[str, jax.Array] = {}
        self.num_encoded = 0  # prompts run through the encoder (cache misses), for logs and tests
        self.num_forward_calls = 0

    @classmethod
    def from_checkpoint(cls, tokenizer_dir: str, checkpoint_path: str, cfg: TextConfig,
                        device: jax.Device | None = None, **kw: Any) -> "TextEncoder":
        """Tokenizer folder + reference ``.pth`` (converted on the fly, float32 like the reference)."""
        from memflow_jax.convert.t5 import convert_t5_state_dict

        tokenizer = UMT5Tokenizer(tokenizer_dir, cfg.text_len)
        return cls(tokenizer, convert_t5_state_dict(checkpoint_path, cfg), cfg, device, **kw)

    # ----------------------------------------------------------------------------------------------

    @property
    def has_params(self) -> bool:
        return self.params is not None

    def cached(self, prompt: str) -> bool:
        return clean_text(prompt) in self._cache

    def clear_cache(self) -> None:
        self._cache.clear()

    def drop_params(self) -> None:
        """Free the encoder's device copy of the params; cached prompts stay available."""
        for leaf in self._owned:
            if isinstance(leaf, jax.Array) and not leaf.is_deleted():
                leaf.delete()
        self._owned = []
        self.params = None

    def _run(self, cleaned: list[str]) -> None:
        n = len(cleaned)
        padded = 1 << (n - 1).bit_length()  # next power of two
        padded = min(padded, self.batch_size)
        rows = cleaned + [cleaned[0]] * (padded - n)
        ids, mask = self.tokenizer.encode_cleaned(rows)
        if self.device is not None:
            ids, mask = jax.device_put((ids, mask), self.device)
        out = self._forward(self.params, ids, mask)  # [padded, text_len, dim]
        self.num_forward_calls += 1
        self.num_encoded += n
        for j, text in enumerate(cleaned):
            self._cache[text] = out[j]

    def encode(self, prompts: str | Sequence[str]) -> jax.Array:
        """Prompts -> ``prompt_embeds`` ``[B, text_len, dim]`` (rows past each prompt's length are 0)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(prompts) == 0:
            raise TokenizerError("encode() got an empty prompt list")
        cleaned = [clean_text(p) for p in prompts]
        missing = list(dict.fromkeys(c for c in cleaned if c not in self._cache))
        if missing and self.params is None:
            raise RuntimeError(f"text encoder params were dropped (drop_params) but {len(missing)} prompt(s) are "
                               f"not cached, e.g. {missing[0][:60]!r}; encode every prompt before dropping")
        for start in range(0, len(missing), self.batch_size):
            self._run(missing[start:start + self.batch_size])
        return jnp.stack([self._cache[c] for c in cleaned])

    __call__ = encode

    def encode_numpy(self, prompts: str | Sequence[str]) -> np.ndarray:
        return np.asarray(self.encode(prompts))
