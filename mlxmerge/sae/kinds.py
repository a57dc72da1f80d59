"""SAE kinds: one table entry per architecture — inference encoder, training forward and loss,
initialisation, and how it is saved in SAELens v6 format. Adding a kind is adding one class here.

All kinds share ``pre = W_enc (x − b_dec) + b_enc`` and ``x̂ = W_dec z + b_dec``; they differ in z:

* ``topk``: ``z = ReLU(TopK_k(pre))`` per token (Gao et al. 2024, arXiv 2406.04093).
* ``batchtopk``: the k·B largest ReLU'd pre-activations over a batch of B tokens (Bussmann et al.
  2024, arXiv 2412.06410); saved as ``jumprelu`` with one threshold, an EMA of the smallest
  selected activation (SAELens ``BatchTopKTrainingSAE``).
* ``matryoshka_batchtopk``: batchtopk, plus one reconstruction loss per nested prefix of the
  dictionary (Bussmann et al. 2025, arXiv 2503.17547; SAELens ``MatryoshkaBatchTopKTrainingSAE``);
  saved as ``jumprelu``.
* ``relu`` (SAELens ``standard``): ``z = ReLU(pre)`` with an L1 penalty ``λ Σ_i z_i ‖W_dec,i‖``
  (Anthropic, April 2024).
* ``jumprelu``: ``z = pre · H(pre − θ)`` with a learnt per-latent θ ≥ 0 and an L0 penalty
  ``λ Σ_i H(pre_i − θ_i)`` (Rajamanoharan et al. 2024, arXiv 2407.14435). H has no derivative, so
  θ gets the pseudo-derivatives of the paper (SAELens ``jumprelu_sae.py``), with the rectangle
  kernel K(u) = [|u| < ½] of bandwidth ε:  ∂z/∂θ := −(θ/ε) K((pre − θ)/ε),
  ∂H/∂θ := −(1/ε) K((pre − θ)/ε); ∂z/∂pre = H(pre − θ) and ∂H/∂pre := 0. θ itself is the
  parameter, projected to ≥ 0 after each step, as in SAELens ≥ 6.5x (its issue #494): Adam moves
  a parameter by ~lr per step, so the paper's log θ barely leaves a small init in a short run.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import mlx.core as mx

from mlxmerge.sae.model import decode_sparse, gather_pre, select_topk, topk_indices

FIRE_THRESHOLD = 1e-3  # a latent "fires" on a token when its activation exceeds this (OpenAI)


class Forward(NamedTuple):
    """What one kind's training forward gives the shared loss and statistics."""

    x_hat: mx.array  # (B, d_in) reconstruction
    penalty: mx.array  # scalar added to the reconstruction term (sparsity, inner levels)
    l0: mx.array  # mean number of non-zero latents per token
    fired: mx.array  # (d_sae,) tokens on which each latent exceeded FIRE_THRESHOLD
    acts: mx.array  # activation values (BatchTopK's threshold EMA reads their positive minimum)


def _warm(tr) -> mx.array:
    """Sparsity coefficients ramp up linearly over the first 5% of steps (Anthropic)."""
    return mx.minimum(1.0, (tr.stats["step"] + 1) / max(1, int(0.05 * tr.steps)))


def _rectangle(u: mx.array) -> mx.array:
    return ((u > -0.5) & (u < 0.5)).astype(mx.float32)


@mx.custom_function
def jumprelu(pre: mx.array, threshold: mx.array, bandwidth: mx.array) -> mx.array:
    """``pre · H(pre − θ)`` for ``pre (B, d_sae)``, ``θ (d_sae,)``; pseudo-derivative for θ."""
    return pre * (pre > threshold)


@jumprelu.vjp
def _jumprelu_vjp(primals, cotangent, _output):
    pre, threshold, bandwidth = primals
    k = _rectangle((pre - threshold) / bandwidth)
    g_theta = (-(threshold / bandwidth) * k * cotangent).sum(axis=0)
    return (pre > threshold) * cotangent, g_theta, mx.zeros_like(bandwidth)


@mx.custom_function
def step(pre: mx.array, threshold: mx.array, bandwidth: mx.array) -> mx.array:
    """``H(pre − θ)``; no gradient to ``pre``, the rectangle pseudo-derivative to θ."""
    return (pre > threshold).astype(mx.float32)


@step.vjp
def _step_vjp(primals, cotangent, _output):
    pre, threshold, bandwidth = primals
    g_theta = (-(1.0 / bandwidth) * _rectangle((pre - threshold) / bandwidth) * cotangent).sum(
        axis=0
    )
    return mx.zeros_like(pre), g_theta, mx.zeros_like(bandwidth)


class Kind:
    """Defaults: a unit-norm-decoder, AuxK-trained kind with the OpenAI loss and learning rate."""

    name = ""  # --arch, SAEConfig.architecture, SAELens's training architecture name
    saelens = ""  # the architecture written to cfg.json (SAELens's inference class)
    inference = True  # False: exported as another kind (``export``) after training
    uses_k = False  # reads cfg.k
    unit_norm_decoder = True  # renormalise decoder rows after every step, project gradients
    auxk = True  # OpenAI's AuxK loss on dead latents applies
    normalized_mse = True  # reconstruction term Σ‖e‖²/Σ‖x − μ‖² (FVU); else mean ‖e‖² (SAELens)
    clip_grad_norm: float | None = None
    decoder_init_norm = 1.0
    extra_tensors: tuple[str, ...] = ()  # saved beside W_enc, b_enc, W_dec, b_dec

    def default_lr(self, d_sae: int) -> float:
        return 2e-4 * math.sqrt(2**14 / d_sae)  # OpenAI's 1/√n scaling, sparsify's constant

    def lr_schedule(self, lr: float, steps: int):
        return lr

    def check(self, tc, d_sae: int) -> None:
        """Refuse training options that do not fit this kind (before any work)."""

    def init_training(self, params: dict, tc) -> dict:
        """Training-only parameters added to ``init_params``'s."""
        return params

    def encode(self, params: dict, cfg, pre: mx.array) -> mx.array:
        raise NotImplementedError

    def train_forward(self, tr, params: dict, x, xc, pre) -> Forward:
        raise NotImplementedError

    def after_step(self, tr, acts: mx.array) -> None:
        """Statistics updated inside the compiled step (after the optimiser update)."""

    def export(self, tr, params: dict) -> dict:
        """Parameters of the saved (inference) kind from the trained ones."""
        return params

    def exported_kind(self) -> Kind:
        return self

    def export_metadata(self, tr) -> dict:
        """What cfg.json's metadata records about training when saved as another kind."""
        return {}

    def cfg_fields(self, cfg) -> dict:
        """Architecture-specific cfg.json keys, as SAELens 6 writes them."""
        return {}


class TopK(Kind):
    name = saelens = "topk"
    uses_k = True

    def encode(self, params, cfg, pre):
        idx = topk_indices(pre, cfg.k)
        vals = mx.maximum(mx.take_along_axis(pre, idx, axis=-1), 0)
        return mx.put_along_axis(mx.zeros_like(pre), idx, vals, axis=-1)

    def train_forward(self, tr, params, x, xc, pre):
        idx, vals = select_topk(params, xc, pre, tr.cfg.k)
        x_hat = decode_sparse(params["W_dec"], vals, idx) + params["b_dec"]
        fired = _fired(tr.cfg.d_sae, idx.reshape(-1), vals.reshape(-1))
        return Forward(x_hat, mx.array(0.0), (vals > 0).sum() / x.shape[0], fired, vals)

    def cfg_fields(self, cfg):
        return {"k": cfg.k, "rescale_acts_by_decoder_norm": False}


def _fired(d_sae: int, idx: mx.array, vals: mx.array) -> mx.array:
    return mx.zeros((d_sae,)).at[idx].add((vals > FIRE_THRESHOLD).astype(mx.float32))


class JumpReLU(Kind):
    name = saelens = "jumprelu"
    auxk = False  # dead latents are not reconstructed from; SAELens's default too
    normalized_mse = False  # SAELens: mean ‖x − x̂‖² + λ·L0 on inputs scaled to E‖x‖ = √d_in
    extra_tensors = ("threshold",)

    def encode(self, params, cfg, pre):
        return mx.where(pre > params["threshold"], mx.maximum(pre, 0), 0)

    def init_training(self, params, tc):
        return {**params, "threshold": mx.full(params["b_enc"].shape, tc.jumprelu_init_threshold)}

    def train_forward(self, tr, params, x, xc, pre):
        theta = params["threshold"]
        eps = mx.array(tr.tc.jumprelu_bandwidth)
        z = jumprelu(pre, theta, eps)
        x_hat = z @ params["W_dec"] + params["b_dec"]
        l0 = step(pre, theta, eps).sum(axis=-1).mean()
        penalty = tr.tc.l0_coefficient * _warm(tr) * l0
        fired = (z > FIRE_THRESHOLD).sum(axis=0).astype(mx.float32)
        return Forward(x_hat, penalty, mx.stop_gradient(l0), fired, z)

    def after_step(self, tr, acts):
        # below 0 the gate would pass negative pre-activations (SAELens projects the same way)
        tr.params["threshold"] = mx.maximum(tr.params["threshold"], 0.0)


class BatchTopK(Kind):
    name = "batchtopk"
    saelens = "jumprelu"
    inference = False
    uses_k = True
    extra_tensors = ("threshold",)

    def encode(self, params, cfg, pre):
        return KINDS["jumprelu"].encode(params, cfg, pre)

    def init_training(self, params, tc):
        # the threshold is not learnt by gradient but tracked in Trainer.stats (see after_step)
        return {k: v for k, v in params.items() if k != "threshold"}

    def _select(self, tr, params, x, xc, pre):
        """(token, latent, value) of the k·B largest ReLU'd pre-activations of the batch."""
        b, d_sae = x.shape[0], tr.cfg.d_sae
        flat = topk_indices(mx.stop_gradient(mx.maximum(pre, 0)).reshape(-1), tr.cfg.k * b)
        tok, idx = flat // d_sae, flat % d_sae
        raw = gather_pre(params["encoder"], params["b_enc"], params["b_dec"],
                         mx.stop_gradient(xc), mx.stop_gradient(pre), tok, idx)  # fmt: skip
        return tok, idx, mx.maximum(raw, 0)

    def train_forward(self, tr, params, x, xc, pre):
        tok, idx, vals = self._select(tr, params, x, xc, pre)
        upd = vals[:, None] * mx.take(params["W_dec"], idx, axis=0)  # (k·B, d_in)
        x_hat = mx.zeros_like(x).at[tok].add(upd) + params["b_dec"]
        penalty = self.inner_losses(tr, params, x, tok, idx, upd)
        fired = _fired(tr.cfg.d_sae, idx, vals)
        return Forward(x_hat, penalty, (vals > 0).sum() / x.shape[0], fired, vals)

    def inner_losses(self, tr, params, x, tok, idx, upd) -> mx.array:
        return mx.array(0.0)

    def after_step(self, tr, acts):
        # SAELens: threshold = EMA (rate 0.01) of the smallest positive selected activation
        pos_min = mx.where(acts > 0, acts, mx.inf).min()
        t = tr.stats["threshold"]
        new_t = mx.where(tr.stats["step"] == 0, pos_min, 0.99 * t + 0.01 * pos_min)
        tr.stats["threshold"] = mx.where(mx.isfinite(pos_min), new_t, t)

    def export(self, tr, params):
        return {**params, "threshold": mx.full((tr.cfg.d_sae,), tr.stats["threshold"].item())}

    def exported_kind(self):
        return KINDS["jumprelu"]

    def export_metadata(self, tr):
        return {"trained_as": self.name, "batchtopk_k": tr.tc.k}


class MatryoshkaBatchTopK(BatchTopK):
    name = "matryoshka_batchtopk"

    def check(self, tc, d_sae):
        tc.widths_for(d_sae)

    def export_metadata(self, tr):
        return {
            **super().export_metadata(tr),
            "matryoshka_widths": list(tr.tc.widths_for(tr.cfg.d_sae)),
        }

    def inner_losses(self, tr, params, x, tok, idx, upd):
        """Σ over the inner prefixes w of ‖x − (W_dec[:w] z[:w] + b_dec)‖², on the FVU scale
        (the outermost prefix, the whole dictionary, is the main loss)."""
        total, x_hat, lo = mx.array(0.0), mx.broadcast_to(params["b_dec"], x.shape), 0
        for w in tr.tc.widths_for(tr.cfg.d_sae)[:-1]:  # each level adds the latents [lo, w)
            band = ((idx >= lo) & (idx < w)).astype(upd.dtype)[:, None]
            x_hat = x_hat + mx.zeros_like(x).at[tok].add(upd * band)
            total = total + ((x - x_hat) ** 2).sum(axis=-1).mean() / tr.var_total
            lo = w
        return total


class ReLU(Kind):
    name = "relu"
    saelens = "standard"
    unit_norm_decoder = False  # Anthropic: no norm constraint; ‖W_dec,i‖ sits in the penalty
    auxk = False
    normalized_mse = False
    clip_grad_norm = 1.0
    decoder_init_norm = 0.1

    def default_lr(self, d_sae):
        return 5e-5

    def lr_schedule(self, lr, steps):
        decay_start = int(0.8 * steps)  # Anthropic: linear decay to 0 over the last 20%
        return lambda s: lr * mx.minimum(1.0, (steps - s) / max(steps - decay_start, 1))

    def encode(self, params, cfg, pre):
        return mx.maximum(pre, 0)

    def train_forward(self, tr, params, x, xc, pre):
        z = mx.maximum(pre, 0)
        x_hat = z @ params["W_dec"] + params["b_dec"]
        l1 = (z * mx.linalg.norm(params["W_dec"], axis=-1)).sum(axis=-1).mean()
        fired = (z > FIRE_THRESHOLD).sum(axis=0).astype(mx.float32)
        l0 = (z > 0).sum(axis=-1).mean()
        return Forward(x_hat, tr.tc.l1_coefficient * _warm(tr) * l1, l0, fired, z)


KINDS: dict[str, Kind] = {
    k.name: k for k in (TopK(), BatchTopK(), MatryoshkaBatchTopK(), ReLU(), JumpReLU())
}
TRAINABLE = tuple(KINDS)
# cfg.json architecture → the kind it loads as (batchtopk kinds are saved as jumprelu)
FROM_SAELENS = {k.saelens: k.name for k in KINDS.values() if k.inference}
