"""Sparse autoencoder math: parameters, encode/decode, and the sparse training forward.

    z = ReLU(TopK(W_enc (x - b_dec) + b_enc))          (topk; OpenAI, Gao et al. 2024, eq. 1-2)
    x̂ = W_dec z + b_dec

The other kinds (``relu``, ``jumprelu``, ``batchtopk``, ``matryoshka_batchtopk``) are entries of
``mlxmerge.sae.kinds.KINDS``, which ``encode`` dispatches to. Parameters live in a plain dict;
``encoder`` is stored ``[d_sae, d_in]`` so the training backward can scatter into the k selected
rows. SAELens's ``W_enc [d_in, d_sae]`` is its transpose (see ``saelens.py``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import mlx.core as mx

from mlxmerge.errors import MlxmergeError


class SAEError(MlxmergeError):
    """An SAE configuration, file or input does not fit."""


@dataclass
class SAEConfig:
    """Shape and activation of one SAE; the metadata is what ``cfg.json`` records."""

    d_in: int  # width of the residual stream it reads
    d_sae: int  # number of latents
    architecture: str = "topk"  # a key of mlxmerge.sae.kinds.KINDS
    k: int = 32  # active latents per token (topk) or on average (batchtopk)
    apply_b_dec_to_input: bool = True  # subtract b_dec before encoding
    hook_layer: int | None = None  # block i, read at its output (= HF hidden_states[i+1])
    metadata: dict = field(default_factory=dict)  # model id, quantization, dataset, ...

    def __post_init__(self):
        from mlxmerge.sae.kinds import KINDS  # kinds builds on this module's primitives

        if self.architecture not in KINDS:
            raise SAEError(f"architecture {self.architecture!r} is not one of {', '.join(KINDS)}")
        if self.d_in < 1 or self.d_sae < 1:
            raise SAEError(f"d_in and d_sae must be positive, got {self.d_in} and {self.d_sae}")
        if KINDS[self.architecture].uses_k and not 1 <= self.k <= self.d_sae:
            raise SAEError(f"k={self.k} must be between 1 and d_sae={self.d_sae}")

    def to_dict(self) -> dict:
        return asdict(self)


def init_params(cfg: SAEConfig, *, seed: int = 0, b_dec: mx.array | None = None) -> dict:
    """Decoder rows random vectors of the kind's ``decoder_init_norm`` (1; ``relu`` 0.1, as
    Anthropic April-2024), encoder = decoderᵀ, b_enc = 0, b_dec given or 0, thresholds 0.
    """
    from mlxmerge.sae.kinds import KINDS

    kind = KINDS[cfg.architecture]
    key = mx.random.key(seed)
    w = mx.random.normal((cfg.d_sae, cfg.d_in), key=key)
    w = kind.decoder_init_norm * w / mx.linalg.norm(w, axis=-1, keepdims=True)
    params = {
        "encoder": w,  # (d_sae, d_in)
        "b_enc": mx.zeros((cfg.d_sae,)),
        "W_dec": mx.array(w),  # (d_sae, d_in)
        "b_dec": mx.zeros((cfg.d_in,)) if b_dec is None else b_dec.astype(mx.float32),
    }
    for name in kind.extra_tensors:  # (d_sae,) per-latent thresholds
        params[name] = mx.zeros((cfg.d_sae,))
    return params


def pre_activations(params: dict, x: mx.array, apply_b_dec: bool = True) -> mx.array:
    xc = x - params["b_dec"] if apply_b_dec else x
    return xc @ params["encoder"].T + params["b_enc"]


def topk_indices(pre: mx.array, k: int) -> mx.array:
    """Indices of the k largest entries per row: exactly k, ties broken arbitrarily (O(n))."""
    return mx.argpartition(-pre, kth=k - 1, axis=-1)[..., :k]


def encode(params: dict, cfg: SAEConfig, x: mx.array) -> mx.array:
    """Dense latent activations ``(..., d_sae)`` for inference."""
    from mlxmerge.sae.kinds import KINDS

    pre = pre_activations(params, x.astype(mx.float32), cfg.apply_b_dec_to_input)
    return KINDS[cfg.architecture].encode(params, cfg, pre)


def decode(params: dict, z: mx.array) -> mx.array:
    return z @ params["W_dec"] + params["b_dec"]


def reconstruct(params: dict, cfg: SAEConfig, x: mx.array) -> mx.array:
    return decode(params, encode(params, cfg, x))


# -- training forward: dense encoder matmul, everything after it sparse ---------------------


@mx.custom_function
def gather_pre(encoder, b_enc, b_dec, xc, pre, tok, lat):
    """``pre[tok, lat]``, whose backward touches only the selected encoder rows.

    Forward reuses the dense pre-activations; the vjp scatters ``g ⊗ xc`` into ``encoder[lat]``
    instead of a dense ``(B, d_sae)ᵀ @ (B, d_in)`` matmul (sparsify's fused encoder, in MLX).
    """
    return pre[tok, lat]


@gather_pre.vjp
def _gather_pre_vjp(primals, cotangent, _output):
    encoder, b_enc, _b_dec, xc, pre, tok, lat = primals
    g = cotangent  # (n,)
    g_enc = mx.zeros_like(encoder).at[lat].add(g[:, None] * xc[tok])
    g_benc = mx.zeros_like(b_enc).at[lat].add(g)
    # xc = x - b_dec for every token, so b_dec's gradient is -Σ_n g_n encoder[lat_n].
    g_bdec = -(g_benc @ encoder)
    zeros = [mx.zeros_like(a) for a in (xc, pre, tok, lat)]
    return (g_enc, g_benc, g_bdec, *zeros)


def decode_sparse(w_dec: mx.array, vals: mx.array, idx: mx.array) -> mx.array:
    """``Σ_j vals[:, j] · W_dec[idx[:, j]]`` for ``(B, k)`` vals/idx: gathers k rows per token."""
    return (mx.take(w_dec, idx, axis=0) * vals[..., None]).sum(axis=1)


def select_topk(params: dict, xc: mx.array, pre: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """(idx, vals) of the k largest pre-activations per token, ReLU'd, with sparse gradients."""
    b = pre.shape[0]
    idx = topk_indices(mx.stop_gradient(pre), k)  # (B, k)
    tok = mx.broadcast_to(mx.arange(b)[:, None], idx.shape).reshape(-1)
    # Stop-gradient inputs keep autodiff from also running the dense backward of ``pre``.
    xc, pre = mx.stop_gradient(xc), mx.stop_gradient(pre)
    raw = gather_pre(
        params["encoder"], params["b_enc"], params["b_dec"], xc, pre, tok, idx.reshape(-1)
    )
    return idx, mx.maximum(raw.reshape(idx.shape), 0)
