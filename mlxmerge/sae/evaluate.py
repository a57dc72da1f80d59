"""Evaluate an SAE on a model: reconstruction, sparsity and downstream loss with the SAE spliced in.

Downstream numbers are next-token cross-entropy over non-special positions with block ``layer``'s
output (a) untouched, (b) replaced by the SAE reconstruction, (c) zeroed, and
``loss_recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean)`` (SAELens's ce_loss_score);
``kl`` is KL(clean ‖ spliced) per token, ``kl_zero`` the same for zero-ablation.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import mlx.core as mx
import numpy as np

from mlxmerge.lm.blocks import decoder_blocks
from mlxmerge.lm.chat import special_ids
from mlxmerge.lm.load import hidden_size
from mlxmerge.lm.logprobs import cross_entropy, kl_divergence
from mlxmerge.sae.activations import capture_layers, load_model, pack_sequences, read_texts
from mlxmerge.sae.metrics import FVU_FORMULA, ReconstructionStats
from mlxmerge.sae.model import SAEConfig, SAEError, decode, encode
from mlxmerge.sae.saelens import load_sae

log = logging.getLogger(__name__)

DEFAULT_CONTEXT_SIZE = 128  # when the SAE's cfg.json records none


def check_fits(cfg: SAEConfig, model, layer: int | None) -> int:
    """The layer to hook; errors when the SAE cannot read this model's residual stream."""
    layer = cfg.hook_layer if layer is None else layer
    if layer is None:
        hook = cfg.metadata.get("hook_name")
        if hook:  # a hook elsewhere (MLP output, attention heads): other activations entirely
            raise SAEError(
                f"the SAE reads {hook!r}, not the residual stream after a block "
                "(blocks.{i}.hook_resid_post); mlxmerge cannot capture that hook"
            )
        raise SAEError("the SAE's cfg.json names no hook_name; pass --layer")
    n = len(decoder_blocks(model, "sae"))
    if not 0 <= layer < n:
        raise SAEError(f"layer {layer} does not exist: the model has {n} layers (0..{n - 1})")
    d_model = hidden_size(model)
    if d_model is not None and d_model != cfg.d_in:
        raise SAEError(f"the SAE reads d_in={cfg.d_in} but the model's residual stream is "
                       f"{d_model} wide; it was trained on another model")  # fmt: skip
    return layer


def _ce(logits: mx.array, targets: mx.array, mask: mx.array) -> tuple[float, float]:
    nll = cross_entropy(logits, targets)
    return float((nll * mask).sum().item()), float(mask.sum().item())


def _kl(clean: mx.array, other: mx.array, mask: mx.array) -> float:
    return float((kl_divergence(clean, other) * mask).sum().item())


def evaluate_sae(
    sae: str | os.PathLike, model: str | os.PathLike, data: str | os.PathLike, *,
    tokens: int = 20_000, context_size: int | None = None, batch_rows: int = 8,
    layer: int | None = None, progress: Callable[[int], None] | None = None,
) -> dict:  # fmt: skip
    """Reconstruction (FVU, EV, legacy EV), L0, dead/dense latents and spliced-in CE/KL.
    ``progress(n)`` is called with the tokens scored by each batch.

    ``context_size``: tokens per row; None takes the SAE's own (``metadata.context_size`` in its
    cfg.json, else 128): an SAE scored on other context lengths than it was trained on scores
    differently. ``warnings`` in the result lists what makes a number meaningless.
    """
    cfg, params = load_sae(sae)
    if context_size is None:
        context_size = int(cfg.metadata.get("context_size") or DEFAULT_CONTEXT_SIZE)
    texts = read_texts(data)
    m, tok = load_model(model)
    layer = check_fits(cfg, m, layer)
    seqs = pack_sequences(tok, texts, context_size, tokens)
    skip = mx.array(sorted(special_ids(tok)), dtype=mx.int32)
    stats = ReconstructionStats(cfg.d_in, cfg.d_sae)
    ce = np.zeros((3, 2))  # clean, sae, zero: (sum, count)
    kl = np.zeros(2)
    for start in range(0, len(seqs), batch_rows):
        rows = mx.array(seqs[start : start + batch_rows])
        keep = ~(rows[..., None] == skip).any(axis=-1)  # (B, T) non-special positions
        with capture_layers(m, [layer]) as outs:
            clean = m(rows)
        h = outs[layer].astype(mx.float32)
        z = encode(params, cfg, h)
        x_hat = decode(params, z)
        flat = keep.reshape(-1)
        sel = mx.array(np.nonzero(np.array(flat))[0])
        stats.add(
            h.reshape(-1, cfg.d_in)[sel],
            x_hat.reshape(-1, cfg.d_in)[sel],
            z.reshape(-1, cfg.d_sae)[sel],
        )
        dtype = outs[layer].dtype

        def splice(fn, keep=keep, dtype=dtype):
            return lambda out: mx.where(keep[..., None], fn(out).astype(dtype), out)

        with capture_layers(m, [layer], {layer: splice(lambda _o, r=x_hat: r)}):
            spliced = m(rows)
        with capture_layers(m, [layer], {layer: splice(mx.zeros_like)}):
            zeroed = m(rows)
        targets, mask = rows[:, 1:], keep[:, 1:].astype(mx.float32)
        for j, logits in enumerate((clean, spliced, zeroed)):
            ce[j] += _ce(logits[:, :-1].astype(mx.float32), targets, mask)
        kl[0] += _kl(clean[:, :-1].astype(mx.float32), spliced[:, :-1].astype(mx.float32), mask)
        kl[1] += _kl(clean[:, :-1].astype(mx.float32), zeroed[:, :-1].astype(mx.float32), mask)
        mx.clear_cache()
        if progress is not None:
            progress(len(sel))
    result = stats.result()
    ce_clean, ce_sae, ce_zero = (ce[:, 0] / np.maximum(ce[:, 1], 1)).tolist()
    denom = ce_zero - ce_clean
    result.update({
        "ce_clean": ce_clean, "ce_sae": ce_sae, "ce_zero": ce_zero,
        "loss_recovered": (ce_zero - ce_sae) / denom if abs(denom) > 1e-12 else float("nan"),
        "kl": float(kl[0] / max(ce[0, 1], 1)), "kl_zero": float(kl[1] / max(ce[0, 1], 1)),
        "layer": layer, "context_size": context_size, "fvu_formula": FVU_FORMULA,
    })  # fmt: skip
    warnings = []
    if ce_zero <= ce_clean:  # the denominator of loss_recovered is not positive
        warnings.append(
            f"zero-ablating layer {layer} does not raise the loss on this data (CE {ce_zero:.4g} "
            f"vs {ce_clean:.4g} clean), so loss_recovered is meaningless here; use ce_sae, kl"
        )
    result["warnings"] = warnings  # the CLI prints them; the numbers stay as computed
    return result
