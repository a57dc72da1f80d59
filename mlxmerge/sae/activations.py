"""Residual-stream activations: capture them from an mlx-lm model, cache them, read them back.

MLX has no forward hooks, so a probe (``mlxmerge.lm.blocks``) is swapped into decoder block i for
the forward pass; block i's output is HF ``hidden_states[i + 1]`` (SAELens ``blocks.{i}.hook_resid_post``).
Text is packed into rows of ``context_size`` tokens, each starting with BOS; BOS and other special
tokens are left out of what is stored. One forward pass fills every requested layer.

Cache layout (``acts/``): ``meta.json``; ``sequences.npy`` (rows × context_size token ids);
per layer ``layer_{i}/{shard:05d}.npy`` (tokens × d_in); ``index/{shard:05d}.npy`` (tokens × 2:
row, position) so every stored activation maps back to its context. All ``.npy``, memory-mappable.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxmerge.io.documents import read_documents
from mlxmerge.io.output import atomic_folder, check_free_space, check_output
from mlxmerge.io.text import read_text
from mlxmerge.lm.blocks import decoder_blocks, probes
from mlxmerge.lm.chat import special_ids
from mlxmerge.lm.load import hidden_size
from mlxmerge.sae.model import SAEError

log = logging.getLogger(__name__)

META_NAME = "meta.json"


def read_texts(data: str | os.PathLike) -> list[str]:
    """Documents from a ``.txt`` or ``.jsonl`` file (``io.documents.read_documents``)."""
    return read_documents(data, SAEError, "data file")


def load_model(model_path: str | os.PathLike, verb: str = "sae"):
    """``(model, tokenizer)`` through ``mlxmerge.lm``: any model reference (folder, hub id,
    mergekit's ``BASE+ADAPTER``), with open_checkpoint's one-line errors for a bad one."""
    from mlxmerge.lm.load import load

    return load(model_path, verb=verb)


def check_layers(model, layers: list[int]) -> list[int]:
    n = len(decoder_blocks(model, "sae"))
    if not layers:
        raise SAEError("no --layer given")
    for i in layers:
        if not 0 <= i < n:
            raise SAEError(f"layer {i} does not exist: the model has {n} layers (0..{n - 1})")
    return sorted(set(layers))


class _Latest(dict):
    """{layer: block output of the latest forward pass}, read from the probes' records."""

    def __init__(self):
        super().__init__()
        self.sources = {}

    def __getitem__(self, i):
        got = self.sources[i].outputs
        if len(got) > 1:  # keep memory flat across forward passes
            del got[:-1]
        return got[-1]

    def __contains__(self, i):
        return i in self.sources and bool(self.sources[i].outputs)


@contextmanager
def capture_layers(model, layers: list[int], edits: dict | None = None, *, record: bool = True):
    """Swap probes into the blocks ``layers``; yields {layer: block output} after each forward.

    ``edits`` maps a layer to a function applied to its output (used for splicing and steering);
    ``record=False`` only edits (generation: nothing piles up across decoding steps).
    """
    outputs = _Latest()
    with probes(model, layers, verb="sae") as found:
        for i, probe in found.items():
            probe.slot.record = slice(None) if record else None
            probe.slot.edit = (edits or {}).get(i)
            outputs.sources[i] = probe.slot
        yield outputs


def check_sizes(tokens: int, context_size: int) -> None:
    """--tokens and --context-size, before any work: a row is BOS plus at least one token.

    (context 1 divided by zero, context 0 packed rows of nothing, tokens 0 wrote an empty cache.)"""
    if context_size < 2:
        raise SAEError(
            f"--context-size must be at least 2 (BOS plus one token), got {context_size}"
        )
    if tokens < 1:
        raise SAEError(f"--tokens must be at least 1, got {tokens}")


def pack_sequences(tokenizer, texts: list[str], context_size: int, max_tokens: int) -> np.ndarray:
    """Rows of ``context_size`` token ids, each starting with BOS, until ``max_tokens`` non-BOS."""
    check_sizes(max_tokens, context_size)
    bos = getattr(tokenizer, "bos_token_id", None)
    rows, buf = [], []
    body = context_size - (1 if bos is not None else 0)
    needed = -(-max_tokens // body) if max_tokens else None
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        buf.extend(ids)
        while len(buf) >= body:
            rows.append(([bos] if bos is not None else []) + buf[:body])
            buf = buf[body:]
            if needed and len(rows) >= needed:
                return np.array(rows, dtype=np.int32)
    pad = getattr(tokenizer, "pad_token_id", None)
    if buf and pad is not None:  # a last short row, padded with a special token (never stored)
        rows.append(([bos] if bos is not None else []) + buf + [pad] * (body - len(buf)))
    if not rows:
        raise SAEError("the data holds no tokens")
    return np.array(rows, dtype=np.int32)


def iter_activations(
    model, tokenizer, texts: list[str], layers: list[int], *, tokens: int, context_size: int = 128,
    batch_rows: int = 8,
) -> Iterator[tuple[dict[int, np.ndarray], np.ndarray, np.ndarray]]:  # fmt: skip
    """Yield ``({layer: (n, d_in) float32}, token_ids (n,), index (n, 2: row, pos))`` per batch."""
    layers = check_layers(model, layers)
    seqs = pack_sequences(tokenizer, texts, context_size, tokens)
    skip = np.array(sorted(special_ids(tokenizer)), dtype=np.int32)
    done = 0
    for start in range(0, len(seqs), batch_rows):
        rows = seqs[start : start + batch_rows]
        with capture_layers(model, layers) as outs:
            model(mx.array(rows))
            mx.eval([outs[i] for i in layers])
        keep = ~np.isin(rows, skip)
        r, p = np.nonzero(keep)
        take = min(len(r), tokens - done)
        r, p = r[:take], p[:take]
        acts = {i: np.array(outs[i].astype(mx.float32))[r, p] for i in layers}
        mx.clear_cache()
        done += take
        yield acts, rows[r, p], np.stack([r + start, p], axis=1).astype(np.int32)
        if done >= tokens:
            return
    if done == 0:
        raise SAEError("no tokens left after removing BOS/special tokens")


def collect(
    model: str | os.PathLike, layer: list[int], data: str | os.PathLike, out: str | os.PathLike, *,
    tokens: int = 2_000_000, context_size: int = 128, batch_rows: int = 8,
    shard_tokens: int = 262_144, dtype: str = "float32", force: bool = False, progress=None,
) -> dict:  # fmt: skip
    """Run ``model`` over ``data`` and cache block outputs of ``layer`` to ``out``; returns meta."""
    if dtype not in ("float32", "float16"):
        raise SAEError(f"dtype {dtype!r}: use float32 or float16")
    check_sizes(tokens, context_size)
    texts = read_texts(data)
    target = check_output(out, inputs=[model], force=force)
    m, tok = load_model(model, verb="sae collect")
    layers = check_layers(m, list(layer))
    d_in = hidden_size(m)
    seqs = pack_sequences(tok, texts, context_size, tokens)
    # Activations of every layer, token ids and (row, position) index per token; the tokens the
    # data holds (up to ``tokens``), not ``tokens`` itself.
    per_token = len(layers) * d_in * np.dtype(dtype).itemsize + 3 * 8
    size = min(tokens, seqs.size) * per_token + seqs.nbytes
    check_free_space(target, size, "the activation cache")
    with atomic_folder(target, force=force) as tmp:
        buf = {i: [] for i in layers}
        ids_buf, idx_buf, shards, n_total = [], [], [], 0

        def flush():
            if not ids_buf:
                return
            name = f"{len(shards):05d}.npy"
            for i in layers:
                (tmp / f"layer_{i}").mkdir(exist_ok=True)
                np.save(tmp / f"layer_{i}" / name, np.concatenate(buf[i]).astype(dtype))
                buf[i].clear()
            (tmp / "index").mkdir(exist_ok=True)
            np.save(tmp / "index" / name, np.concatenate(idx_buf))
            np.save(tmp / "index" / f"tokens_{name}", np.concatenate(ids_buf))
            shards.append({"file": name, "tokens": int(sum(len(a) for a in ids_buf))})
            ids_buf.clear()
            idx_buf.clear()

        for acts, ids, index in iter_activations(m, tok, texts, layers, tokens=tokens,
                                                 context_size=context_size, batch_rows=batch_rows):  # fmt: skip
            for i in layers:
                buf[i].append(acts[i])
                d_in = acts[i].shape[1]
            ids_buf.append(ids)
            idx_buf.append(index)
            n_total += len(ids)
            if sum(len(a) for a in ids_buf) >= shard_tokens:
                flush()
            if progress is not None:
                progress(len(ids))
        flush()
        np.save(tmp / "sequences.npy", seqs)
        meta = {
            "model": str(Path(model).expanduser().resolve()),
            "quantization": _quantization(model),
            "layers": layers,
            "d_in": d_in,
            "tokens": n_total,
            "context_size": context_size,
            "dtype": dtype,
            "dataset_path": str(data),
            "exclude_special_tokens": True,
            "prepend_bos": True,
            "shards": shards,
        }
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2))
    return meta


def _quantization(model_path) -> dict | None:
    try:
        cfg = json.loads((Path(model_path).expanduser() / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return cfg.get("quantization") or cfg.get("quantization_config")


class ActivationStore:
    """Cached activations of one layer, memory-mapped; an activation source for ``train_sae``."""

    def __init__(self, folder: str | os.PathLike, layer: int | None = None):
        self.folder = Path(folder).expanduser()
        meta_path = self.folder / META_NAME
        if not meta_path.is_file():
            raise SAEError(
                f"{self.folder}: no {META_NAME}; not an activation cache from `sae collect`"
            )
        try:
            self.meta = json.loads(read_text(meta_path, META_NAME, SAEError))
            layers = list(self.meta["layers"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise SAEError(f"{meta_path}: not the JSON `sae collect` writes (no layers)") from None
        if layer is None:
            if len(layers) != 1:
                raise SAEError(f"{self.folder} holds layers {layers}; choose one with --layer")
            layer = layers[0]
        if layer not in layers:
            raise SAEError(f"layer {layer} is not in {self.folder} (it holds layers {layers})")
        self.layer = layer
        self.shards = [np.load(self.folder / f"layer_{layer}" / s["file"], mmap_mode="r")
                       for s in self.meta["shards"]]  # fmt: skip
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
        self.d_in = int(self.meta["d_in"])
        if self.offsets[-1] == 0:
            raise SAEError(f"{self.folder}: the cache holds no tokens")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def rows(self, index: np.ndarray) -> np.ndarray:
        index = np.sort(index)
        shard = np.searchsorted(self.offsets, index, side="right") - 1
        out = np.empty((len(index), self.d_in), dtype=np.float32)
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self.shards[s][index[sel] - self.offsets[s]]
        return out

    def batch(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """n activations drawn uniformly at random (with replacement across batches)."""
        return self.rows(rng.integers(0, len(self), n))

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return self.rows(rng.choice(len(self), min(n, len(self)), replace=False))

    def tokens(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(token ids (n,), index (n, 2: row, position), sequences (rows, context_size))."""
        idx = [np.load(self.folder / "index" / s["file"]) for s in self.meta["shards"]]
        ids = [np.load(self.folder / "index" / f"tokens_{s['file']}") for s in self.meta["shards"]]
        return np.concatenate(ids), np.concatenate(idx), np.load(self.folder / "sequences.npy")


class ArraySource:
    """Activations held in memory (on-the-fly training); same interface as ``ActivationStore``."""

    def __init__(self, acts: np.ndarray):
        if len(acts) == 0:
            raise SAEError("no activations collected")
        self.acts = np.asarray(acts, dtype=np.float32)
        self.d_in = self.acts.shape[1]

    def __len__(self) -> int:
        return len(self.acts)

    def rows(self, index: np.ndarray) -> np.ndarray:
        return self.acts[index]

    def batch(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return self.acts[rng.integers(0, len(self.acts), n)]

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return self.acts[rng.choice(len(self.acts), min(n, len(self.acts)), replace=False)]
