"""Text-embedding cache: UMT5 ``prompt_embeds`` computed once per distinct prompt, read back by training.

Build::

    python -m memflow_jax.data.text_cache build --prompts prompts/vidprom_filtered_extended.txt \\
        prompts/vidprom_filtered_extended_switch.txt --out cache/text \\
        --encoder-ckpt wan_models/Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth \\
        --tokenizer-dir wan_models/Wan2.1-T2V-1.3B/google/umt5-xxl
    python -m memflow_jax.data.text_cache build --prompts data/storyworld/clips/prompts.txt \\
        --out data/storyworld/text_cache --converted-ckpt runs/storyworld/art/text
    python -m memflow_jax.data.text_cache info cache/text

The encoder comes from a reference ``.pth`` (``--encoder-ckpt`` + ``--tokenizer-dir``), from a converted
checkpoint folder with component ``t5``, ``tokenizer/`` and ``config.json`` (``--converted-ckpt``: its stored
``text`` section is the config, e.g. ``memflow_jax.storyworld.text_model``'s output) or from a factory.
The negative prompt is added unless ``--no-negative-prompt``: ``--negative-prompt``, else the converted
checkpoint's ``negative_prompt`` (``""`` for the storyworld demo), else the reference's. The empty prompt ``""``
is an ordinary entry (its one ``</s>`` row is stored).

The encoder zeroes every row past a prompt's token count (reference ``WanTextEncoder``: ``u[v:] = 0``), so
only rows up to the last non-zero one are stored; reading pads with zeros back to ``[text_len, dim]`` —
bit-identical to the encoder output. Layout of the folder (written to a temporary sibling, then renamed)::

    index.json          format, text_len, dim, dtype, entries [[prompt, shard, start_row, n_rows], ...]
    rows-00000.npy      [n, dim] concatenated rows (bfloat16 stored as its uint16 bits)

``encode_fn(list[str]) -> [N, text_len, dim]`` is injectable (tests use a fake); the default loads
``memflow_jax.text.encoder.TextEncoder`` lazily.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import tempfile
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from memflow_jax.io.atomic import replace_dir
from memflow_jax.data.prompts import DataError, all_prompts

FORMAT = "memflow_jax.text_cache"
VERSION = 1
INDEX = "index.json"
DTYPES = ("float32", "bfloat16", "float16")

EncodeFn = Callable[[list[str]], Any]


def _np_dtype(name: str) -> Any:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _to_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    x = x.astype(_np_dtype(dtype))
    return x.view(np.uint16) if dtype == "bfloat16" else x


def _from_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    return x.view(_np_dtype(dtype)) if dtype == "bfloat16" else x


def _valid_rows(emb: np.ndarray) -> int:
    """Rows up to the last row with a non-zero value (the padding rows are exactly zero)."""
    nz = np.flatnonzero(np.any(emb != 0, axis=-1))
    return int(nz[-1]) + 1 if nz.size else 0


def build_cache(prompts: Iterable[str], out_dir: str | os.PathLike, encode_fn: EncodeFn, batch_size: int = 8,
                dtype: str = "bfloat16", shard_rows: int = 1 << 15, meta: Mapping[str, Any] | None = None,
                overwrite: bool = False, log: Callable[[str], None] | None = None) -> str:
    """Encode each distinct prompt once (first-seen order) and write the cache folder; returns its path."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {list(DTYPES)}")
    if batch_size < 1 or shard_rows < 1:
        raise ValueError("batch_size and shard_rows must be >= 1")
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace it")
    unique = list(dict.fromkeys(prompts))
    if not unique:
        raise DataError("no prompts to encode")
    for p in unique:
        if not isinstance(p, str):
            raise DataError(f"prompts must be strings, got {type(p).__name__}: {p!r:.60}")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
    try:
        entries: list[list[Any]] = []
        shards: list[dict[str, Any]] = []
        buf: list[np.ndarray] = []
        buf_rows = 0
        text_len = dim = None

        def flush() -> None:
            nonlocal buf, buf_rows
            name = f"rows-{len(shards):05d}.npy"
            rows = np.concatenate(buf, 0) if buf else np.zeros((0, dim or 0), np.float32)
            np.save(os.path.join(tmp, name), _to_storage(rows, dtype))
            shards.append({"file": name, "rows": int(rows.shape[0])})
            buf, buf_rows = [], 0

        for start in range(0, len(unique), batch_size):
            batch = unique[start:start + batch_size]
            emb = np.asarray(encode_fn(list(batch)), dtype=np.float32)
            if emb.ndim != 3 or emb.shape[0] != len(batch):
                raise ValueError(f"encode_fn returned shape {emb.shape} for {len(batch)} prompts; "
                                 "expected [N, text_len, dim]")
            if text_len is None:
                text_len, dim = int(emb.shape[1]), int(emb.shape[2])
            elif emb.shape[1:] != (text_len, dim):
                raise ValueError(f"encode_fn returned [.., {emb.shape[1]}, {emb.shape[2]}] after "
                                 f"[.., {text_len}, {dim}]; the encoder must have a fixed text_len / dim")
            for p, e in zip(batch, emb):
                n = _valid_rows(e)
                if buf_rows and buf_rows + n > shard_rows:
                    flush()
                entries.append([p, len(shards), buf_rows, n])
                buf.append(e[:n])
                buf_rows += n
            if log is not None:
                log(f"encoded {min(start + batch_size, len(unique))}/{len(unique)} prompts")
        flush()
        index = {"format": FORMAT, "version": VERSION, "text_len": text_len, "dim": dim, "dtype": dtype,
                 "count": len(entries), "shards": shards, "entries": entries, "meta": dict(meta or {})}
        with open(os.path.join(tmp, INDEX), "w", encoding="utf-8") as f:
            json.dump(index, f, ensure_ascii=False)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


class TextEmbeddingCache:
    """Read a cache folder: ``cache[prompt] -> [text_len, dim]``, ``lookup(prompts) -> [N, text_len, dim]``."""

    def __init__(self, directory: str | os.PathLike, as_dtype: Any = None):
        self.directory = os.path.abspath(os.fspath(directory))
        path = os.path.join(self.directory, INDEX)
        if not os.path.isfile(path):
            raise DataError(f"{self.directory}: not a text-embedding cache (no {INDEX}); build one with "
                            "`python -m memflow_jax.data.text_cache build --prompts FILE --out DIR ...`")
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            raise DataError(f"{path}: format {index.get('format')!r} v{index.get('version')} is not "
                            f"{FORMAT!r} v{VERSION}; rebuild the cache")
        self.text_len, self.dim, self.dtype = index["text_len"], index["dim"], index["dtype"]
        self.meta = index.get("meta", {})
        self._shards = [s["file"] for s in index["shards"]]
        self._entries = {p: (s, a, n) for p, s, a, n in index["entries"]}
        self.prompts = [e[0] for e in index["entries"]]
        self.as_dtype = _np_dtype(self.dtype) if as_dtype is None else np.dtype(as_dtype)
        self._arrays: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._entries

    def _shard(self, i: int) -> np.ndarray:
        if i not in self._arrays:  # memory-mapped, opened on first use (so the source pickles to workers)
            self._arrays[i] = np.load(os.path.join(self.directory, self._shards[i]), mmap_mode="r")
        return self._arrays[i]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"] = {}
        return state

    def __getitem__(self, prompt: str) -> np.ndarray:
        try:
            shard, start, n = self._entries[prompt]
        except KeyError:
            raise DataError(f"prompt not in the text-embedding cache {self.directory}: {prompt!r:.100}; rebuild "
                            "it with `python -m memflow_jax.data.text_cache build` over every prompt file") from None
        out = np.zeros((self.text_len, self.dim), self.as_dtype)
        rows = _from_storage(np.asarray(self._shard(shard)[start:start + n]), self.dtype)
        out[:n] = rows.astype(self.as_dtype)
        return out

    def lookup(self, prompts: Sequence[str]) -> np.ndarray:
        """``[N, text_len, dim]`` for ``prompts`` (in order; duplicates allowed)."""
        return np.stack([self[p] for p in prompts])


class CachedEmbeddingSource:
    """Wraps a prompt source and adds the cached embeddings of its prompt fields.

    ``"prompts"`` -> ``"prompt_embeds"`` ``[text_len, dim]``, ``"switch_prompts"`` -> ``"switch_prompt_embeds"``,
    ``"prompts_list"`` -> ``"prompts_list_embeds"`` ``[S, text_len, dim]``. Every prompt is checked against
    the cache up front, so a stale cache fails at start-up, not mid-run.
    """

    FIELDS = {"prompts": "prompt_embeds", "switch_prompts": "switch_prompt_embeds",
              "prompts_list": "prompts_list_embeds"}

    def __init__(self, source: Any, cache: TextEmbeddingCache | str | os.PathLike, check: bool = True):
        self.source = source
        self.cache = cache if isinstance(cache, TextEmbeddingCache) else TextEmbeddingCache(cache)
        if check:
            missing = []
            for i in range(len(source)):
                rec = source[i]
                for field in self.FIELDS:
                    if field in rec:
                        value = rec[field]
                        vals = [value] if isinstance(value, str) else [str(v) for v in np.asarray(value).ravel()]
                        missing.extend(v for v in vals if v not in self.cache)
            if missing:
                raise DataError(f"{len(missing)} prompt(s) of the data are not in the cache {self.cache.directory}, "
                                f"e.g. {missing[0]!r:.100}; rebuild it with `python -m memflow_jax.data.text_cache "
                                "build` over every prompt file")

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = dict(self.source[i])
        for field, out in self.FIELDS.items():
            if field in rec:
                value = rec[field]
                if isinstance(value, str):
                    rec[out] = self.cache[value]
                else:
                    rec[out] = self.cache.lookup([str(v) for v in np.asarray(value).ravel()])
        return rec


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _load_factory(spec: str) -> Callable[[], EncodeFn]:
    if ":" not in spec:
        raise SystemExit(f"--encoder-factory {spec!r}: expected 'package.module:function'")
    mod, fn = spec.split(":", 1)
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"--encoder-factory {spec!r}: {e}") from None


def _text_encoder_fn(args: argparse.Namespace) -> EncodeFn:
    from memflow_jax import config as cfg_lib
    from memflow_jax.text.encoder import TextEncoder  # lazy: the UMT5 front end is heavy

    if not args.tokenizer_dir:
        raise SystemExit("--encoder-ckpt needs --tokenizer-dir (the umt5-xxl tokenizer folder)")
    cfg = cfg_lib.load(args.config, args.set)
    enc = TextEncoder.from_checkpoint(args.tokenizer_dir, args.encoder_ckpt, cfg.text, batch_size=args.batch_size)

    def encode(prompts: list[str]) -> np.ndarray:
        out = enc.encode_numpy(prompts)
        enc.clear_cache()  # its per-prompt cache would otherwise hold every embedding in memory
        return out

    return encode


def _converted_encoder_fn(args: argparse.Namespace) -> tuple[EncodeFn, dict[str, Any]]:
    """``encode_fn`` of a converted checkpoint folder (component ``t5`` + ``tokenizer/`` + ``config.json``) and
    the folder's ``config.json``."""
    from memflow_jax import config as cfg_lib
    from memflow_jax.convert.common import ConversionError, load_component, read_converted_meta
    from memflow_jax.nn import t5 as t5_nn
    from memflow_jax.text.encoder import TextEncoder
    from memflow_jax.text.tokenizer import TokenizerError, UMT5Tokenizer

    ckpt = args.converted_ckpt
    if args.config:
        raise SystemExit(f"--config is not used with --converted-ckpt: the text config comes from {ckpt}/config.json "
                         "(use --set text.dtype=bfloat16 for numerics)")
    try:
        meta = read_converted_meta(ckpt)
        stored = meta.get("config") or {}
        if "text" not in stored:
            raise ConversionError(f"{ckpt}/config.json has no 'text' config section (sections: {sorted(stored)}); "
                                  "write it with memflow_jax.storyworld.text_model or memflow_jax.convert --t5")
        cfg = cfg_lib.from_dict(cfg_lib.merge({"text": stored["text"]}, cfg_lib.parse_overrides(args.set)))
        tok_dir = args.tokenizer_dir or os.path.join(ckpt, "tokenizer")
        tokenizer = UMT5Tokenizer(tok_dir, cfg.text.text_len)
        params = load_component(ckpt, "t5", t5_nn.abstract_params(cfg.text))
        enc = TextEncoder(tokenizer, params, cfg.text, batch_size=args.batch_size)
    except (ConversionError, TokenizerError, cfg_lib.ConfigError, ValueError) as e:
        raise SystemExit(f"--converted-ckpt {ckpt}: {e}") from None

    def encode(prompts: list[str]) -> np.ndarray:
        out = enc.encode_numpy(prompts)
        enc.clear_cache()
        return out

    return encode, meta


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m memflow_jax.data.text_cache", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="encode every distinct prompt of the prompt files")
    b.add_argument("--prompts", nargs="+", required=True, help=".txt (one prompt per line) or .jsonl files")
    b.add_argument("--out", required=True, help="cache folder to write")
    enc = b.add_mutually_exclusive_group(required=True)
    enc.add_argument("--encoder-ckpt", help="UMT5 encoder .pth (models_t5_umt5-xxl-enc-bf16.pth)")
    enc.add_argument("--converted-ckpt", help="converted checkpoint folder with component t5, tokenizer/ and "
                     "config.json (its text section is the config), e.g. storyworld.text_model's output")
    enc.add_argument("--encoder-factory", help="'module:function' returning encode_fn(list[str]) -> [N, L, D]")
    b.add_argument("--tokenizer-dir", help="umt5-xxl tokenizer folder (with --encoder-ckpt; with --converted-ckpt "
                   "default DIR/tokenizer)")
    b.add_argument("--config", help="YAML config (its text.* section; not with --converted-ckpt); defaults: umt5-xxl")
    b.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. text.dtype=bfloat16")
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="storage dtype")
    b.add_argument("--shard-rows", type=int, default=1 << 15, help="token rows per shard file")
    neg = b.add_mutually_exclusive_group()
    neg.add_argument("--negative-prompt", default=None, help="extra prompt to cache, may be '' (default: the "
                     "converted checkpoint's negative_prompt, else train's)")
    neg.add_argument("--no-negative-prompt", action="store_true", help="do not add the negative prompt")
    b.add_argument("--on-blank", default="keep", choices=("keep", "skip", "error"),
                   help="blank lines of .txt files (reference: keep as the empty prompt)")
    b.add_argument("--overwrite", action="store_true")
    i = sub.add_parser("info", help="print a cache's summary")
    i.add_argument("dir")
    args = ap.parse_args(argv)

    if args.cmd == "info":
        cache = TextEmbeddingCache(args.dir)
        print(json.dumps({"dir": cache.directory, "prompts": len(cache), "text_len": cache.text_len,
                          "dim": cache.dim, "dtype": cache.dtype, "meta": cache.meta}, indent=1))
        return 0

    prompts: list[str] = []
    for path in args.prompts:
        prompts.extend(all_prompts(path, args.on_blank))
    ckpt_meta: dict[str, Any] = {}
    if args.encoder_factory:
        encode_fn = _load_factory(args.encoder_factory)()
    elif args.converted_ckpt:
        encode_fn, ckpt_meta = _converted_encoder_fn(args)
    else:
        encode_fn = _text_encoder_fn(args)
    negative = None
    if not args.no_negative_prompt:
        negative = args.negative_prompt
        if negative is None and isinstance(ckpt_meta.get("negative_prompt"), str):
            negative = ckpt_meta["negative_prompt"]  # e.g. "" for the storyworld demo
        if negative is None and isinstance((ckpt_meta.get("config", {}).get("train") or {}).get("negative_prompt"),
                                           str):
            negative = ckpt_meta["config"]["train"]["negative_prompt"]
        if negative is None:
            from memflow_jax.training.config import NEGATIVE_PROMPT

            negative = NEGATIVE_PROMPT
        prompts.append(negative)
        print(f"negative prompt: {negative[:60]!r}", file=sys.stderr, flush=True)
    meta = {"prompt_files": [os.path.abspath(p) for p in args.prompts],
            "encoder": args.encoder_ckpt or args.encoder_factory or (args.converted_ckpt and
                                                                      os.path.abspath(args.converted_ckpt)),
            "negative_prompt": negative}
    out = build_cache(prompts, args.out, encode_fn, batch_size=args.batch_size, dtype=args.dtype,
                      shard_rows=args.shard_rows, meta=meta, overwrite=args.overwrite,
                      log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"wrote {len(dict.fromkeys(prompts))} prompt embeddings to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
