"""Edit SAE features into a model's weights: every residual writer stops writing (or writes
``scale`` times) the features' decoder directions.

With Q an orthonormal basis (rows) of span{W_dec[f] : f in features} and λ = 1 − scale, each
residual writer ``W (d_model, d_in)``, its bias and the embedding rows become
``W − λ Qᵀ(Q W)`` — the abliteration edit (Arditi et al. 2024, arXiv 2406.11717,
``mlxmerge.abliterate.orthogonalize``) with the features' directions in place of the refusal
direction, applied once per basis vector (exact, as the basis is orthonormal). The residual stream
is the sum of what these write, so with ``scale`` 0 it has no component in the span at any
layer: the SAE reading it sees the features' directions gone. Post-norm blocks (Gemma 2/3) edit
at the sublayer output along an orthonormal basis of ``g ⊙ Q`` (``post_norm_direction``), which
is exact for ``scale`` 0 and approximate otherwise (the norm's 1/rms changes with the edit).
With tied embeddings the edit also removes the span from the unembedding's input side.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxmerge.abliterate.architectures import architecture, embedding_tensor, writer_tensors
from mlxmerge.abliterate.orthogonalize import (
    orthogonalize_bias,
    orthogonalize_embedding,
    orthogonalize_weight,
)
from mlxmerge.io import ModelCard, open_checkpoint, write_model
from mlxmerge.io.finite import FiniteGuard
from mlxmerge.io.output import check_output
from mlxmerge.sae.model import SAEError
from mlxmerge.sae.saelens import load_sae

REPORT_NAME = "sae_ablation.json"


def orthonormal_basis(vectors: np.ndarray, where: str = "decoder rows") -> np.ndarray:
    """Rows spanning the same space as ``vectors (m, d)``, orthonormal (QR in float64)."""
    v = np.asarray(vectors, np.float64)
    q, r = np.linalg.qr(v.T)  # q (d, m)
    diag = np.abs(np.diag(r))
    if (diag <= 1e-6 * max(np.linalg.norm(v, axis=1).max(), 1e-30)).any():
        raise SAEError(f"the {where} are linearly dependent (or zero); ablate fewer features")
    return q.T


def _edit(w: mx.array, basis: np.ndarray, lam: float, kind: str) -> mx.array:
    for q in basis:  # one rank-1 edit per orthonormal direction: together W − λ QᵀQ W
        r = mx.array(q.astype(np.float32))
        if kind == "bias":
            w = orthogonalize_bias(w, r, lam)
        elif kind == "embedding":
            w = orthogonalize_embedding(w, r, lam)
        else:
            w = orthogonalize_weight(w, r, lam)
    return w


def ablate_features(
    sae: str | os.PathLike, model: str | os.PathLike, output: str | os.PathLike, *,
    features: list[int], scale: float = 0.0, dtype: str = "bfloat16", layout: str = "mlx",
    force: bool = False, progress=None,
) -> dict:  # fmt: skip
    """Write ``model`` with the SAE ``features``' decoder directions scaled by ``scale`` (0:
    removed) in what every residual writer and the embedding write. Returns the report that is
    also saved as ``sae_ablation.json`` in the output.

    Errors (``SAEError``): no or unknown features, a decoder row of zero or linearly dependent
    rows, an SAE of another width than the model's residual stream; model types without a
    residual-writer entry (``mlxmerge.abliterate.architectures``) are refused by name.
    """
    if not features:
        raise SAEError("give at least one --feature")
    if dtype not in ("bfloat16", "float16", "float32"):
        raise SAEError(f"--dtype {dtype!r}: use bfloat16, float16 or float32")
    check_output(output, inputs=[model, sae], force=force)
    cfg, params = load_sae(sae)
    bad = [f for f in features if not 0 <= f < cfg.d_sae]
    if bad:
        raise SAEError(f"feature {bad[0]} does not exist: the SAE has {cfg.d_sae} latents")
    features = sorted(set(features))
    ckpt = open_checkpoint(model)
    arch = architecture(ckpt.model_type)
    _, hidden = ckpt.config_field("hidden_size")
    if hidden is not None and int(hidden) != cfg.d_in:
        raise SAEError(f"the SAE reads d_in={cfg.d_in} but {model}'s residual stream is "
                       f"{hidden} wide; it was trained on another model")  # fmt: skip
    dirs = np.array(params["W_dec"], np.float64)[features]  # (m, d_in)
    basis = orthonormal_basis(dirs, f"decoder rows of features {features}")
    lam = 1.0 - float(scale)
    guard = FiniteGuard(False, "sae ablate")
    names = ckpt.names()
    by_name = {w.name: w for w in writer_tensors(names, arch)}
    emb_name = embedding_tensor(names, arch)

    def get(name: str, dt=None) -> mx.array:
        return guard.watch(str(ckpt.reference), name, ckpt.get(name, dt))

    def compute(name: str) -> mx.array:
        wt = by_name.get(name)
        if wt is not None:
            b = basis
            if wt.norm_weight:  # post-norm: edit along g ⊙ q (see the module docstring)
                g = np.array(arch.gain_offset + get(wt.norm_weight, mx.float32), np.float64)
                b = orthonormal_basis(basis * g, f"{wt.norm_weight}-scaled directions")
            kind = "bias" if name.endswith(".bias") else "weight"
            return _edit(get(name, mx.float32), b, lam, kind)
        if name == emb_name:
            return _edit(get(name, mx.float32), basis, lam, "embedding")
        return get(name)

    cos = dirs @ dirs.T / np.outer(np.linalg.norm(dirs, axis=1), np.linalg.norm(dirs, axis=1))
    report = {
        "sae": str(sae), "model": str(model), "features": features, "scale": float(scale),
        "sae_layer": cfg.hook_layer, "edited_tensors": len(by_name) + (emb_name is not None),
        "decoder_cosines": np.round(cos, 4).tolist(),
    }  # fmt: skip
    card = ModelCard(
        f"{Path(str(ckpt.reference)).name} (SAE features {features} x{scale:g})",
        body=f"SAE features {features} of `{sae}` scaled by {scale:g} in every residual writer "
        "(mlxmerge sae ablate).",
        base_models=[str(ckpt.reference)], tags=["mlxmerge", "sae-ablated"],
    )  # fmt: skip
    plan = [(n, ckpt.shape(n)) for n in names]
    write_model(
        output, plan, compute, config=ckpt.config, tokenizer_source=ckpt.path, card=card,
        dtype=getattr(mx, dtype), layout=layout, inputs=[str(ckpt.path), str(sae)], force=force,
        extra_files={REPORT_NAME: json.dumps(report, indent=1)}, guard=guard,
        progress=(lambda _n: progress(1)) if progress else None,
    )  # fmt: skip
    return report
