"""Feature report: top-activating contexts, density and logit-lens tokens per latent (HTML + JSON).

Logit lens: the decoder row goes through the model's final norm and unembedding; the tokens with
the largest logits are the ones the feature promotes.
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
    top_tokens: int = 10, layer: int | None = None, force: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict:  # fmt: skip
    """Write ``features.json`` and ``index.html`` to ``out``; returns the JSON content.
    ``progress(n)`` is called with the tokens encoded by each batch."""
    cfg, params = load_sae(sae)
    texts = read_texts(data)
    target = check_output(out, inputs=[sae, model], force=force)
    m, tok = load_model(model)
    layer = check_fits(cfg, m, layer)
    for f in features or []:
        if not 0 <= f < cfg.d_sae:
            raise SAEError(f"feature {f} does not exist: the SAE has {cfg.d_sae} latents")
    acts, ids, index = [], [], []
    fired = np.zeros(cfg.d_sae)
    for a, t, i in iter_activations(
        m, tok, texts, [layer], tokens=tokens, context_size=context_size
    ):
        z = np.array(encode(params, cfg, mx.array(a[layer])))
        fired += (z > 1e-3).sum(axis=0)
        acts.append(z)
        ids.append(t)
        index.append(i)
        if progress is not None:
            progress(len(t))
    z, ids, index = np.concatenate(acts), np.concatenate(ids), np.concatenate(index)
    density = fired / len(ids)
    chosen = (
        list(features)
        if features
        else [f for f in np.argsort(-density)[:n_features].tolist() if density[f] > 0]
    )
    seqs = pack_sequences(tok, texts, context_size, tokens)
    where = {(int(r), int(p)): n for n, (r, p) in enumerate(index)}
    w_dec = params["W_dec"][mx.array(chosen, dtype=mx.int32)] if chosen else None
    lens = np.array(unembed(m, w_dec).astype(mx.float32)) if chosen else None
    report = {"layer": layer, "d_sae": cfg.d_sae, "tokens": len(ids), "features": []}
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
            "index": f, "density": float(density[f]), "max_activation": float(col.max()),
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
            f"{report['d_sae']} latents, {report['tokens']} tokens</p>"
        ),
    ]
    for feat in report["features"]:
        parts.append(f"<div class=f id=f{feat['index']}><h2>Feature {feat['index']}</h2>"
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
