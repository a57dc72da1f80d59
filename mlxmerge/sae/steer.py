"""Generate with one SAE feature pushed, pinned or removed in the residual stream at its layer.

* add (``scale``): ``h ← h + scale · d_f / ‖d_f‖`` at every position (d_f = decoder row f).
* clamp (``clamp``): ``h ← h + (c - f(h)) · d_f`` with f(h) the feature's SAE activation, so the
  SAE's error term is kept (Templeton et al. 2024).
* ablate: clamp to 0.

How big an edit is depends on the model: Gemma's residual norm is ~6,500 where a tiny model's is
~10, so ``--scale 8`` is a no-op on one and large on the other. ``relative=True`` reads ``scale``
in units of the median residual norm at the layer on the prompt (‖h‖ over its positions), and the
result reports the mean edit norm over that norm; below ``TOO_SMALL`` a warning says so.
"""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np

from mlxmerge.sae.activations import capture_layers, load_model
from mlxmerge.sae.evaluate import check_fits
from mlxmerge.sae.model import SAEError, encode
from mlxmerge.sae.saelens import load_sae

TOO_SMALL = 0.05  # edit norm / residual norm below which greedy output rarely changes


def steering_edit(params: dict, cfg, feature: int, *, scale: float | None = None,
                  clamp: float | None = None, ablate: bool = False):  # fmt: skip
    """The function applied to the block output ``h (B, T, d)``."""
    d = params["W_dec"][feature]
    if ablate:
        clamp = 0.0
    if clamp is not None:

        def edit(h):
            f = encode(params, cfg, h.astype(mx.float32))[..., feature]
            return (h + ((clamp - f)[..., None] * d).astype(h.dtype)).astype(h.dtype)

        return edit
    unit = d / mx.maximum(mx.linalg.norm(d), 1e-12)
    s = 0.0 if scale is None else float(scale)
    return lambda h: h + (s * unit).astype(h.dtype)


def steer(
    sae: str | os.PathLike, model: str | os.PathLike, prompt: str, *, feature: int,
    scale: float | None = None, clamp: float | None = None, ablate: bool = False,
    max_tokens: int = 40, layer: int | None = None, chat: bool = False, relative: bool = False,
) -> dict:  # fmt: skip
    """Greedy generation without and with the edit; returns ``{"plain": ..., "steered": ...}``
    plus ``residual_norm`` (median ‖h‖ at the layer on the prompt), ``edit_ratio`` (mean edit
    norm over it) and ``warnings``.

    ``chat``: the prompt is a user turn in the tokenizer's chat template (assistant turn opened).
    ``relative``: ``scale`` is in units of ``residual_norm``.
    """
    from mlxmerge.lm.chat import chat_tokens, eos_token_ids
    from mlxmerge.lm.generate import generate_tokens

    if sum(x is not None for x in (scale, clamp)) + bool(ablate) != 1:
        raise SAEError("give exactly one of --scale, --clamp or --ablate")
    cfg, params = load_sae(sae)
    if not 0 <= feature < cfg.d_sae:
        raise SAEError(f"feature {feature} does not exist: the SAE has {cfg.d_sae} latents")
    m, tok = load_model(model)
    layer = check_fits(cfg, m, layer)
    # the raw prompt, as mlx_lm.generate takes it, or a user turn of the chat template
    ids = [chat_tokens(tok, [prompt])[0] if chat else tok.encode(prompt)]

    def greedy() -> str:
        out = generate_tokens(m, ids, eos_ids=eos_token_ids(tok), max_tokens=max_tokens)
        return tok.decode(out[0])

    plain = greedy()
    with capture_layers(m, [layer]) as outs:
        m(mx.array(ids))
        h = outs[layer].astype(mx.float32)
    norm = float(np.median(np.array(mx.linalg.norm(h, axis=-1))))
    if relative and scale is not None:
        scale = scale * norm
    edit = steering_edit(params, cfg, feature, scale=scale, clamp=clamp, ablate=ablate)
    ratio = float(mx.linalg.norm(edit(h) - h, axis=-1).mean().item()) / max(norm, 1e-30)
    warnings = []
    if 0 < ratio < TOO_SMALL:
        warnings.append(
            f"the edit is {ratio:.2%} of the residual norm at layer {layer} (median {norm:.4g} on "
            "the prompt) and will hardly change the output; give --scale in residual norms with "
            "--relative (e.g. --scale 0.5 --relative)"
        )
    with capture_layers(m, [layer], {layer: edit}, record=False):
        steered = greedy()
    return {
        "prompt": prompt,
        "feature": feature,
        "layer": layer,
        "chat": chat,
        "plain": plain,
        "steered": steered,
        "residual_norm": norm,
        "edit_ratio": ratio,
        "warnings": warnings,
    }
