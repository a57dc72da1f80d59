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
from mlxmerge.sae.heldout import MAX_HELD_OUT, split_held_out
from mlxmerge.sae.metrics import reconstruction_metrics
from mlxmerge.sae.model import SAEError
from mlxmerge.sae.plot import training_curve
from mlxmerge.sae.saelens import save_sae
from mlxmerge.sae.train import TrainConfig, train_sae

log = logging.getLogger(__name__)


def train(
    out: str | os.PathLike, *, acts: str | os.PathLike | None = None, model: str | os.PathLike | None = None,
    layer: int | None = None, data: str | os.PathLike | None = None, k: int = 32, expansion: int = 8,
    architecture: str = "topk", tokens: int = 2_000_000, batch_size: int = 4096, lr: float | None = None,
    seed: int = 0, context_size: int = 128, log_every: int = 50, collect_tokens: int | None = None,
    buffer_tokens: int | None = None, held_out: float = 0.05, force: bool = False, progress=None,
    **train_options,
) -> dict:  # fmt: skip
    """Train from ``acts`` (a ``sae collect`` folder) or on the fly from ``model`` + ``layer`` + ``data``.

    On the fly, activations stream through a shuffled ``MixingBuffer`` of ``buffer_tokens``
    (default ``16 × batch_size``), refilled by forward passes: memory does not grow with
    ``tokens``. ``collect_tokens`` caps the tokens read from ``data`` per pass (it repeats);
    the held-out tokens then come from the last documents of ``data``, which training never reads.

    ``held_out``: fraction of the activations (the last ones, from whole contexts; at most
    16,384 tokens) never trained on; the history's ``heldout_*`` columns and the summary's
    ``eval_*`` metrics are measured on them (0: none held out, the summary's ``train_sample_*``
    metrics are then on training rows). Writes an SAELens folder with ``history.json``,
    ``train_summary.json`` and ``training_curve.png``; returns the summary.
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
        texts, held_rows = _held_out_documents(m, tok, texts, layer, held_out, context_size)
        source = _streaming_source(m, tok, texts, layer, collect_tokens or tokens, context_size,
                                   buffer_tokens or 16 * batch_size)  # fmt: skip
        meta = {"model_name": str(Path(model).expanduser().resolve()), "quantization": _quant(model),
                "dataset_path": str(data), "context_size": context_size}  # fmt: skip
    if tc.k > tc.d_sae_for(source.d_in):
        raise SAEError(f"k={k} is larger than d_sae={tc.d_sae_for(source.d_in)}; "
                       "lower --k or raise --expansion")  # fmt: skip
    if acts is not None:
        source, held = split_held_out(source, held_out, seed=seed)
    else:
        held = held_rows
    if held is not None and hasattr(source, "__len__"):
        log.info("held out %d tokens; training on the other %d", len(held), len(source))
    if hasattr(source, "__len__") and tokens > len(source):
        log.warning(
            "training on %d tokens drawn from %d cached activations (repeats)", tokens, len(source)
        )
    result = train_sae(source, tc, metadata=meta, hook_layer=layer, on_step=progress, held_out=held)
    if held is None:  # nothing held out: say that these are training rows
        sample = source.sample(16384, np.random.default_rng(seed + 1))
        final = {f"train_sample_{k}": v for k, v in reconstruction_metrics(result.cfg, result.params, sample).items()}  # fmt: skip
    else:
        final = {f"eval_{k}": v for k, v in reconstruction_metrics(result.cfg, result.params, held).items()}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        png = training_curve(result.history, Path(tmp) / "training_curve.png")
        png = png.read_bytes() if png is not None else None
    summary = {**(result.history[-1] if result.history else {}), **final,
               "tokens_per_second_overall": result.tokens_per_second, "layer": layer, "d_sae": result.cfg.d_sae}  # fmt: skip
    extra = {"history.json": json.dumps(result.history, indent=1),
             "train_summary.json": json.dumps(summary, indent=1)}  # fmt: skip
    if png is not None:  # without matplotlib: skipped with a warning (plot.MISSING)
        extra["training_curve.png"] = png
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


def _held_out_documents(model, tokenizer, texts, layer, fraction, context_size):
    """``(training texts, held-out activations (n, d_in) or None)``: the last documents of the
    corpus (``fraction`` of them, at least one, the tokens capped at ``MAX_HELD_OUT``) are run
    once and kept apart; the streaming buffer never reads them."""
    if not 0 <= fraction < 1:
        raise SAEError(f"--held-out must be a fraction in [0, 1), got {fraction!r}")
    if fraction == 0:
        return texts, None
    if len(texts) < 2:
        log.warning("the corpus is one document: nothing is held out (split it or add another)")
        return texts, None
    n_held = min(len(texts) - 1, max(1, round(fraction * len(texts))))
    keep, held = texts[: len(texts) - n_held], texts[len(texts) - n_held :]
    rows = [acts[layer] for acts, _, _ in iter_activations(
        model, tokenizer, held, [layer], tokens=MAX_HELD_OUT, context_size=context_size)]  # fmt: skip
    return keep, (np.concatenate(rows) if rows else None)


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
