"""Feature report: top-activating contexts, density and logit-lens tokens per latent (HTML + JSON).

Logit lens: the decoder row goes through the model's final norm and unembedding; the tokens with
the largest logits are the ones the feature promotes.

Without ``--feature``, the page shows latents by density band, as SAE dashboards do: ``frequent``
(1-10% of tokens), ``medium`` (0.1-1%) and ``rare`` (< 0.1%), evenly spread over each band's
density ranks; ``dense`` latents (> 10%), which rarely read as one concept, come apart at the end.
Tokens whose residual norm exceeds ``outlier_factor`` (5) × the median (massive activations,
e.g. Gemma 3's apostrophes at ~9× the median norm) are left out of densities and contexts, counted.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Callable

import mlx.core as mx
import numpy as np

from mlxmerge.io.output import atomic_folder, check_output
from mlxmerge.sae.activations import iter_activations, load_model, pack_sequences, read_texts
from mlxmerge.sae.evaluate import check_fits
from mlxmerge.sae.model import SAEError, encode
from mlxmerge.sae.saelens import load_sae

BANDS = (("frequent", 1e-2, 0.1), ("medium", 1e-3, 1e-2), ("rare", 0.0, 1e-3))  # (name, lo, hi]
DENSE = 0.1  # density above which a latent is shown apart
N_DENSE_SHOWN = 10


def band_of(density: float) -> str:
    if density > DENSE:
        return "dense"
    return next(name for name, lo, hi in BANDS if lo < density <= hi)


def choose_features(density: np.ndarray, n_features: int) -> list[int]:
    """Latents spread evenly over the density ranks of each band, frequent first; then up to
    ``N_DENSE_SHOWN`` dense ones. Latents that never fire are left out."""
    per_band = -(-n_features // len(BANDS))
    chosen = []
    for _name, lo, hi in BANDS:
        band = np.flatnonzero((density > lo) & (density <= hi))
        band = band[np.argsort(-density[band], kind="stable")]
        take = min(per_band, len(band))
        chosen += (
            band[np.linspace(0, len(band) - 1, take).round().astype(int)].tolist() if take else []
        )
    dense = np.flatnonzero(density > DENSE)
    return chosen[:n_features] + dense[np.argsort(-density[dense])][:N_DENSE_SHOWN].tolist()


def unembed(model, v: mx.array) -> mx.array:
    """Logits for residual vectors ``v`` through the final norm and the (tied) unembedding."""
    inner = getattr(model, "model", None)
    norm = getattr(inner, "norm", None)
    h = norm(v) if norm is not None else v
    if hasattr(model, "lm_head"):
        return model.lm_head(h)
    return inner.embed_tokens.as_linear(h)


def feature_report(
    sae: str | os.PathLike, model: str | os.PathLike, data: str | os.PathLike,
    out: str | os.PathLike, *, features: list[int] | None = None, n_features: int = 50,
    tokens: int = 20_000, context_size: int = 128, top_contexts: int = 10, window: int = 8,
    top_tokens: int = 10, layer: int | None = None, outlier_factor: float = 5.0,
    force: bool = False, progress: Callable[[int], None] | None = None,
) -> dict:  # fmt: skip
    """Write ``features.json`` and ``index.html`` to ``out``; returns the JSON content.

    Each feature carries its density ``band``; ``outlier_tokens`` counts the tokens left out for a
    residual norm above ``outlier_factor`` × the median. ``progress(n)`` is called with the tokens
    encoded by each batch."""
    cfg, params = load_sae(sae)
    texts = read_texts(data)
    target = check_output(out, inputs=[sae, model], force=force)
    m, tok = load_model(model)
    layer = check_fits(cfg, m, layer)
    for f in features or []:
        if not 0 <= f < cfg.d_sae:
            raise SAEError(f"feature {f} does not exist: the SAE has {cfg.d_sae} latents")
    acts, ids, index, norms = [], [], [], []
    for a, t, i in iter_activations(
        m, tok, texts, [layer], tokens=tokens, context_size=context_size
    ):
        acts.append(np.array(encode(params, cfg, mx.array(a[layer]))))
        norms.append(np.linalg.norm(a[layer], axis=-1))
        ids.append(t)
        index.append(i)
        if progress is not None:
            progress(len(t))
    z, ids, index = np.concatenate(acts), np.concatenate(ids), np.concatenate(index)
    norms = np.concatenate(norms)
    outlier = norms > outlier_factor * np.median(norms)
    z[outlier] = 0  # never a top context, not counted in densities
    density = (z > 1e-3).sum(axis=0) / max(int((~outlier).sum()), 1)
    chosen = list(features) if features else choose_features(density, n_features)
    seqs = pack_sequences(tok, texts, context_size, tokens)
    where = {(int(r), int(p)): n for n, (r, p) in enumerate(index)}
    w_dec = params["W_dec"][mx.array(chosen, dtype=mx.int32)] if chosen else None
    lens = np.array(unembed(m, w_dec).astype(mx.float32)) if chosen else None
    report = {"layer": layer, "d_sae": cfg.d_sae, "tokens": int((~outlier).sum()),
              "outlier_tokens": int(outlier.sum()), "outlier_factor": outlier_factor,
              "bands": {b: int((np.vectorize(band_of)(density[density > 0]) == b).sum())
                        for b in ("dense", *(n for n, _, _ in BANDS))},
              "features": []}  # fmt: skip
    for j, f in enumerate(chosen):
        col = z[:, f]
        best = [int(n) for n in np.argsort(-col)[:top_contexts] if col[n] > 0]
        contexts = []
        for n in best:
            r, p = index[n]
            lo, hi = max(0, p - window), min(seqs.shape[1], p + window + 1)
            toks = [tok.decode([int(t)]) for t in seqs[r, lo:hi]]
            vals = [
                float(col[where[(int(r), q)]]) if (int(r), q) in where else 0.0
                for q in range(lo, hi)
            ]
            contexts.append(
                {"tokens": toks, "values": vals, "focus": int(p - lo), "activation": float(col[n])}
            )
        top = np.argsort(-lens[j])[:top_tokens]
        report["features"].append({
            "index": f, "density": float(density[f]), "band": band_of(float(density[f])),
            "max_activation": float(col.max()),
            "top_contexts": contexts,
            "promoted_tokens": [[tok.decode([int(t)]), float(lens[j, t])] for t in top],
        })  # fmt: skip
    with atomic_folder(target, force=force) as tmp:
        (tmp / "features.json").write_text(json.dumps(report, indent=1))
        (tmp / "index.html").write_text(render_html(report, sae))
    return report


def render_html(report: dict, title) -> str:
    """A static page: one section per feature, token background proportional to activation."""
    esc = html.escape
    parts = [
        (
            "<!doctype html><meta charset='utf-8'><title>SAE features</title><style>"
            "body{font:14px sans-serif;margin:2em;max-width:70em}"
            ".ctx{font-family:monospace;margin:2px 0}.t{white-space:pre;padding:0 1px}"
            ".f{border:1px solid #ccc;padding:.5em;margin:1em 0}</style>"
        ),
        (
            f"<h1>SAE features: {esc(str(title))}</h1><p>layer {report['layer']}, "
            f"{report['d_sae']} latents, {report['tokens']} tokens ({report['outlier_tokens']} "
            f"left out: residual norm over {report['outlier_factor']:g}x the median); latents per "
            "band: " + ", ".join(f"{b} {n}" for b, n in report["bands"].items()) + "</p>"
        ),
    ]
    band = None
    for feat in report["features"]:
        if feat["band"] != band:  # one heading per density band, dense latents apart at the end
            band = feat["band"]
            parts.append(f"<h2>{esc(band)} latents</h2>")
        parts.append(f"<div class=f id=f{feat['index']}><h3>Feature {feat['index']}</h3>"
                     f"<p>density {feat['density']:.4%}, max activation {feat['max_activation']:.3f}</p>"
                     "<p>promotes: " + ", ".join(f"<code>{esc(t)}</code> ({v:.2f})"
                                                 for t, v in feat["promoted_tokens"]) + "</p>")  # fmt: skip
        for ctx in feat["top_contexts"]:
            peak = max(ctx["values"]) or 1.0
            spans = []
            for i, (t, v) in enumerate(zip(ctx["tokens"], ctx["values"])):
                alpha = max(0.0, v / peak)
                border = "border-bottom:2px solid #000;" if i == ctx["focus"] else ""
                spans.append(f"<span class=t title='{v:.3f}' style='{border}"
                             f"background:rgba(255,120,0,{alpha:.2f})'>{esc(t)}</span>")  # fmt: skip
            parts.append(
                f"<div class=ctx>{''.join(spans)}  <small>{ctx['activation']:.3f}</small></div>"
            )
        parts.append("</div>")
    return "\n".join(parts)
