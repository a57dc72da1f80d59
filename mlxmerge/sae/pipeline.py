"""End-to-end verbs: train an SAE from cached or fresh activations and save it; the demo's quick SAE."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxmerge.io.output import check_output
from mlxmerge.sae.activations import (
    ActivationStore,
    check_layers,
    iter_activations,
    load_model,
    pack_sequences,
    read_texts,
)
from mlxmerge.sae.buffer import MixingBuffer
from mlxmerge.sae.metrics import ReconstructionStats
from mlxmerge.sae.model import SAEError, decode, encode
from mlxmerge.sae.plot import training_curve
from mlxmerge.sae.saelens import save_sae
from mlxmerge.sae.train import TrainConfig, train_sae

log = logging.getLogger(__name__)


def train(
    out: str | os.PathLike, *, acts: str | os.PathLike | None = None, model: str | os.PathLike | None = None,
    layer: int | None = None, data: str | os.PathLike | None = None, k: int = 32, expansion: int = 8,
    architecture: str = "topk", tokens: int = 2_000_000, batch_size: int = 4096, lr: float | None = None,
    seed: int = 0, context_size: int = 128, log_every: int = 50, collect_tokens: int | None = None,
    buffer_tokens: int | None = None, force: bool = False, progress=None, **train_options,
) -> dict:  # fmt: skip
    """Train from ``acts`` (a ``sae collect`` folder) or on the fly from ``model`` + ``layer`` + ``data``.

    On the fly, activations stream through a shuffled ``MixingBuffer`` of ``buffer_tokens``
    (default ``16 × batch_size``), refilled by forward passes: memory does not grow with
    ``tokens``. ``collect_tokens`` caps the tokens read from ``data`` per pass (it repeats).

    Writes an SAELens folder with ``history.json`` and ``training_curve.png``; returns the final
    log row plus held-out reconstruction metrics.
    """
    if (acts is None) == (model is None):
        raise SAEError("give either --acts FOLDER or MODEL with --layer and --data")
    inputs = [p for p in (acts, model) if p is not None]
    check_output(out, inputs=inputs, force=force)
    tc = TrainConfig(k=k, expansion=expansion, architecture=architecture, tokens=tokens,
                     batch_size=batch_size, lr=lr, seed=seed, log_every=log_every, **train_options)  # fmt: skip
    if k < 1:
        raise SAEError(f"k={k} must be at least 1")
    if acts is not None:
        source = ActivationStore(acts, layer)
        layer = source.layer
        meta = {"model_name": source.meta["model"], "quantization": source.meta.get("quantization"),
                "dataset_path": source.meta.get("dataset_path"),
                "context_size": source.meta.get("context_size")}  # fmt: skip
    else:
        if layer is None or data is None:
            raise SAEError("training on the fly needs --layer and --data")
        texts = read_texts(data)
        m, tok = load_model(model)
        check_layers(m, [layer])
        source = _streaming_source(m, tok, texts, layer, collect_tokens or tokens, context_size,
                                   buffer_tokens or 16 * batch_size)  # fmt: skip
        meta = {"model_name": str(Path(model).expanduser().resolve()), "quantization": _quant(model),
                "dataset_path": str(data), "context_size": context_size}  # fmt: skip
    if tc.k > tc.d_sae_for(source.d_in):
        raise SAEError(f"k={k} is larger than d_sae={tc.d_sae_for(source.d_in)}; "
                       "lower --k or raise --expansion")  # fmt: skip
    if tokens > len(source):
        log.warning(
            "training on %d tokens drawn from %d cached activations (repeats)", tokens, len(source)
        )
    result = train_sae(source, tc, metadata=meta, hook_layer=layer, on_step=progress)
    held_out = reconstruction_metrics(
        result.cfg, result.params, source.sample(16384, np.random.default_rng(seed + 1))
    )
    with tempfile.TemporaryDirectory() as tmp:
        png = training_curve(result.history, Path(tmp) / "training_curve.png").read_bytes()
    summary = {**(result.history[-1] if result.history else {}), **{f"eval_{k}": v for k, v in held_out.items()},
               "tokens_per_second_overall": result.tokens_per_second, "layer": layer, "d_sae": result.cfg.d_sae}  # fmt: skip
    extra = {"history.json": json.dumps(result.history, indent=1), "training_curve.png": png,
             "train_summary.json": json.dumps(summary, indent=1)}  # fmt: skip
    if mx.distributed.init().rank() == 0:  # with mlx.launch, one process writes
        save_sae(out, result.cfg, result.params, sparsity=result.feature_density, extra_files=extra,
                 force=force)  # fmt: skip
    summary["out"] = str(out)
    return summary


def _streaming_source(model, tokenizer, texts, layer, tokens, context_size, buffer_tokens):
    """A ``MixingBuffer`` fed by forward passes over ``texts`` (at most ``tokens`` per pass)."""
    from mlxmerge.lm.chat import special_ids
    from mlxmerge.lm.load import hidden_size

    seqs = pack_sequences(tokenizer, texts, context_size, tokens)
    skip = np.array(sorted(special_ids(tokenizer)), dtype=np.int32)
    per_pass = min(tokens, int((~np.isin(seqs, skip)).sum()))

    def stream():
        for acts, _, _ in iter_activations(model, tokenizer, texts, [layer], tokens=tokens,
                                           context_size=context_size):  # fmt: skip
            yield acts[layer]

    buffer_tokens = min(buffer_tokens, max(per_pass, 2))  # all the data fits: hold it all
    d_in = hidden_size(model)
    if d_in is None:  # an architecture that names its width otherwise: one forward pass says
        d_in = next(stream()).shape[1]
    buffer = MixingBuffer(stream, d_in, buffer_tokens, tokens_per_pass=per_pass)
    log.info("on-the-fly activations: a shuffled buffer of %d tokens (%.0f MB), refilled by "
             "forward passes", buffer_tokens, buffer.nbytes / 1e6)  # fmt: skip
    return buffer


def reconstruction_metrics(cfg, params, x: np.ndarray, batch: int = 4096) -> dict:
    """FVU, EV (both kinds), L0 and dead/dense fractions of an SAE on activations ``x``."""
    stats = ReconstructionStats(cfg.d_in, cfg.d_sae)
    for i in range(0, len(x), batch):
        xb = mx.array(x[i : i + batch])
        z = encode(params, cfg, xb)
        stats.add(xb, decode(params, z), z)
    return stats.result()


def _quant(model) -> dict | None:
    try:
        cfg = json.loads((Path(model).expanduser() / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return cfg.get("quantization")


def quick_sae(
    model_path: str | os.PathLike, layer: int, out: str | os.PathLike, *, tokens: int = 4096,
    steps: int = 300, k: int = 8, expansion: int = 4, data: str | os.PathLike | None = None,
    seed: int = 0, force: bool = False,
) -> dict:  # fmt: skip
    """Demo-sized SAE: collect ``tokens`` activations at ``layer``, train a TopK SAE for ``steps``
    steps of 512 tokens, save it (SAELens format) to ``out`` and return the metrics dict.

    Without ``data`` it uses the built-in tiny-model corpus (``mlxmerge.demo.tiny``).
    """
    with tempfile.TemporaryDirectory() as tmp:
        if data is None:
            from mlxmerge.demo.tiny import _corpus

            data = Path(tmp) / "corpus.txt"
            data.write_text("\n".join(_corpus(2000, seed=seed + 7)))
        return train(out, model=model_path, layer=layer, data=data, k=k, expansion=expansion,
                     tokens=steps * 512, batch_size=512, collect_tokens=tokens, seed=seed,
                     log_every=max(1, steps // 10), force=force)  # fmt: skip
