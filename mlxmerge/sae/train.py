"""Train an SAE on a stream of activation batches with one ``mx.compile``d step.

Default recipe (OpenAI, Gao et al. 2024, https://arxiv.org/abs/2406.04093): TopK with ReLU after
selection; encoder = decoderᵀ at init; unit-norm decoder rows, re-normalised after every step with
the gradient component parallel to each row removed first; b_dec at the geometric median; loss
``Σ‖x - x̂‖² / Σ‖x - μ‖²`` (FVU, μ from the init sample) plus AuxK
``(1/32) · ‖W_dec z_aux - e‖² / ‖e - ē‖²`` over the k_aux largest *dead* latents, e = x - x̂
detached; dead = no activation > 1e-3 for ``dead_tokens`` tokens; Adam with bias correction,
eps 6.25e-10, lr = 2e-4·√(2¹⁴ / d_sae). Inputs are scaled by one scalar so E‖x‖ = √d_in, folded
into the weights at the end, so the saved SAE reads raw activations.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from mlxmerge.sae.model import (
    SAEConfig,
    SAEError,
    decode_sparse,
    gather_pre,
    init_params,
    select_topk,
    topk_indices,
)

log = logging.getLogger(__name__)

FIRE_THRESHOLD = 1e-3  # a latent "fires" on a token when its activation exceeds this (OpenAI)


@dataclass
class TrainConfig:
    """How to train; every field has the default of the recipe above."""

    k: int = 32  # active latents per token
    expansion: int = 8  # d_sae = expansion · d_in (ignored when d_sae is set)
    d_sae: int | None = None  # number of latents, overrides expansion
    architecture: str = "topk"  # topk | batchtopk | relu
    tokens: int = 2_000_000  # training tokens in total
    batch_size: int = 4096  # tokens per step (global, over all processes)
    lr: float | None = None  # None: 2e-4·√(2¹⁴/d_sae) (topk, batchtopk) or 5e-5 (relu)
    adam_eps: float = 6.25e-10  # OpenAI's; MLX's default is 1e-8
    auxk_alpha: float = 1 / 32  # AuxK weight; 0 turns AuxK off
    k_aux: int | None = None  # None: min(d_in // 2, 512)
    dead_tokens: int | None = None  # dead window; None: min(10M, max(tokens // 20, 16 · batch))
    l1_coefficient: float = 5.0  # relu only: λ in λ·Σ f_i‖W_dec,i‖, warmed up over 5% of steps
    init_samples: int = 32768  # tokens for b_dec (geometric median) and the input scale
    normalize: bool = True  # scale inputs so E‖x‖ = √d_in while training (folded at save)
    log_every: int = 50  # steps between history entries
    seed: int = 0  # initialisation and batch order

    def __post_init__(self):
        # Caught here, before any collection or training: 0 crashed (batch_size: ZeroDivisionError)
        # or trained nothing silently (tokens), a negative lr climbs the loss.
        for name in ("k", "expansion", "tokens", "batch_size", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                flag = name.replace("_", "-")
                raise SAEError(f"--{flag} must be a positive integer, got {value!r}")
        if self.d_sae is not None and self.d_sae < 1:
            raise SAEError(f"d_sae must be a positive integer, got {self.d_sae!r}")
        if self.lr is not None and not self.lr > 0:
            raise SAEError(f"--lr must be positive, got {self.lr!r}")

    def d_sae_for(self, d_in: int) -> int:
        return self.d_sae or self.expansion * d_in


@dataclass
class TrainResult:
    cfg: SAEConfig
    params: dict
    history: list[dict] = field(default_factory=list)
    feature_density: np.ndarray | None = (
        None  # fraction of late-training tokens each latent fired on
    )
    tokens_per_second: float = 0.0


def geometric_median(x: mx.array, iters: int = 100, tol: float = 1e-6) -> mx.array:
    """Weiszfeld iterations from the mean; the mean when they do not give a finite answer."""
    mean = x.mean(axis=0)
    m = mean
    for _ in range(iters):
        w = 1 / mx.maximum(mx.linalg.norm(x - m, axis=-1), 1e-8)
        new = (w[:, None] * x).sum(axis=0) / w.sum()
        shift = mx.linalg.norm(new - m).item()
        m = new
        if shift <= tol * (mx.linalg.norm(m).item() + 1e-12):
            break
    return m if bool(mx.isfinite(m).all()) else mean


def _lr_schedule(tc: TrainConfig, d_sae: int, steps: int):
    if tc.architecture == "relu":
        lr = tc.lr or 5e-5
        decay_start = int(0.8 * steps)  # Anthropic: linear decay to 0 over the last 20%
        return lambda step: lr * mx.minimum(1.0, (steps - step) / max(steps - decay_start, 1))
    return tc.lr or 2e-4 * math.sqrt(2**14 / d_sae)


def _divergence_message(step: int, loss: float, tc: TrainConfig, d_sae: int, scale: float) -> str:
    lr = tc.lr or (5e-5 if tc.architecture == "relu" else 2e-4 * math.sqrt(2**14 / d_sae))
    return (
        f"training diverged at step {step}: the loss is {loss}; likely causes: the learning "
        f"rate ({lr:.3g}; try a tenth) or the input scale (activations scaled by {scale:.3g}"
        f"{'' if tc.normalize else ', normalize is off'}; non-finite or huge activations)"
    )


class Trainer:
    """Holds parameters, Adam state and firing statistics; ``step(x)`` runs one compiled update."""

    def __init__(self, cfg: SAEConfig, tc: TrainConfig, init_sample: np.ndarray, steps: int):
        self.cfg, self.tc, self.steps = cfg, tc, steps
        self.group = mx.distributed.init() if mx.distributed.is_available() else None
        self.world = self.group.size() if self.group is not None else 1
        x0 = mx.array(init_sample, dtype=mx.float32)
        norm = mx.linalg.norm(x0, axis=-1).mean().item()
        self.scale = math.sqrt(cfg.d_in) / norm if tc.normalize and norm > 0 else 1.0
        x0 = x0 * self.scale
        b_dec = geometric_median(x0) if cfg.apply_b_dec_to_input else mx.zeros((cfg.d_in,))
        self.var_total = mx.array(((x0 - x0.mean(axis=0)) ** 2).sum(axis=-1).mean().item())
        self.params = init_params(cfg, seed=tc.seed, b_dec=b_dec)
        self.opt = optim.Adam(
            learning_rate=_lr_schedule(tc, cfg.d_sae, steps), eps=tc.adam_eps, bias_correction=True
        )
        self.opt.init(self.params)
        self.stats = {
            "since_fired": mx.zeros((cfg.d_sae,), dtype=mx.float32),  # tokens since last > 1e-3
            "fire_count": mx.zeros((cfg.d_sae,), dtype=mx.float32),
            "step": mx.array(0.0),
            "threshold": mx.array(0.0),  # batchtopk: exported as the JumpReLU threshold
        }
        self.k_aux = tc.k_aux or min(cfg.d_in // 2, 512)
        self.k_aux = max(1, min(self.k_aux, cfg.d_sae))
        self.dead_tokens = tc.dead_tokens or min(
            10_000_000, max(tc.tokens // 20, 16 * tc.batch_size)
        )
        self._steps = {}  # compiled step per AuxK width (0 = no AuxK)
        mx.eval(self.params, self.opt.state, self.stats)

    # -- the loss ------------------------------------------------------------------------------
    def _loss(self, params, x, dead, k_aux):
        cfg, tc = self.cfg, self.tc
        b = x.shape[0]
        xc = x - params["b_dec"] if cfg.apply_b_dec_to_input else x
        pre = xc @ params["encoder"].T + params["b_enc"]  # (B, d_sae), the one dense matmul
        if cfg.architecture == "topk":
            idx, vals = select_topk(params, xc, pre, cfg.k)
            x_hat = decode_sparse(params["W_dec"], vals, idx) + params["b_dec"]
            idx, vals = idx.reshape(-1), vals.reshape(-1)
        elif cfg.architecture == "batchtopk":
            # top k·B of the ReLU'd pre-activations over the whole batch
            flat = topk_indices(mx.stop_gradient(mx.maximum(pre, 0)).reshape(-1), cfg.k * b)
            tok, idx = flat // cfg.d_sae, flat % cfg.d_sae
            raw = gather_pre(params["encoder"], params["b_enc"], params["b_dec"],
                             mx.stop_gradient(xc), mx.stop_gradient(pre), tok, idx)  # fmt: skip
            vals = mx.maximum(raw, 0)
            upd = vals[:, None] * mx.take(params["W_dec"], idx, axis=0)
            x_hat = mx.zeros_like(x).at[tok].add(upd) + params["b_dec"]
        else:  # relu
            z = mx.maximum(pre, 0)
            x_hat = z @ params["W_dec"] + params["b_dec"]
        e = x - x_hat
        mse = (e**2).sum(axis=-1).mean()
        if cfg.architecture == "relu":
            warm = mx.minimum(1.0, (self.stats["step"] + 1) / max(1, int(0.05 * self.steps)))
            l1 = (z * mx.linalg.norm(params["W_dec"], axis=-1)).sum(axis=-1).mean()
            loss = mse + tc.l1_coefficient * warm * l1
            fired = (z > FIRE_THRESHOLD).sum(axis=0).astype(mx.float32)
            l0 = (z > 0).sum(axis=-1).mean()
            vals = z
        else:
            loss = mse / self.var_total
            fired = mx.zeros((cfg.d_sae,)).at[idx].add((vals > FIRE_THRESHOLD).astype(mx.float32))
            l0 = (vals > 0).sum() / b
        aux = mx.array(0.0)
        if k_aux:
            aux = self._auxk(params, xc, pre, mx.stop_gradient(e), dead, k_aux)
            loss = loss + tc.auxk_alpha * aux
        var_b = ((x - x.mean(axis=0)) ** 2).sum(axis=-1).mean()
        return loss, mse, var_b, l0, aux, mx.stop_gradient(fired), mx.stop_gradient(vals)

    def _auxk(self, params, xc, pre, e, dead, k_aux):
        """OpenAI AuxK: reconstruct the residual from the k_aux largest dead latents only."""
        b = pre.shape[0]
        masked = mx.where(dead, mx.stop_gradient(pre), -mx.inf)
        idx = topk_indices(masked, k_aux)  # (B, k_aux)
        if 16 * k_aux <= self.cfg.d_sae:  # sparse: gather k_aux rows per token
            tok = mx.broadcast_to(mx.arange(b)[:, None], idx.shape).reshape(-1)
            raw = gather_pre(params["encoder"], params["b_enc"], params["b_dec"],
                             mx.stop_gradient(xc), mx.stop_gradient(pre), tok, idx.reshape(-1))  # fmt: skip
            # fewer dead latents than k_aux: the alive ones picked to fill up contribute nothing
            vals = mx.maximum(raw.reshape(idx.shape), 0) * dead[idx]
            e_hat = decode_sparse(params["W_dec"], vals, idx)
        else:  # k_aux is a large part of d_sae: dense matmuls are cheaper than gathers
            vals = mx.maximum(mx.take_along_axis(pre, idx, axis=-1), 0) * dead[idx]
            z = mx.put_along_axis(mx.zeros_like(pre), idx, vals, axis=-1)
            e_hat = z @ params["W_dec"]
        num = ((e_hat - e) ** 2).sum(axis=-1).mean()
        if self.world > 1:  # the residual's variance over the global batch, as one process sees it
            n = b * self.world
            s1, s2 = mx.distributed.all_sum(e.sum(axis=0)), mx.distributed.all_sum((e**2).sum())
            den = (s2 - (s1**2).sum() / n) / n
        else:
            den = ((e - e.mean(axis=0)) ** 2).sum(axis=-1).mean()
        return mx.nan_to_num(num / den, nan=0.0, posinf=0.0, neginf=0.0)

    def _make_step(self, k_aux: int):
        value_and_grad = mx.value_and_grad(self._loss)
        unit_norm = self.cfg.architecture != "relu"

        def step(x, dead_tokens):
            dead = self.stats["since_fired"] >= dead_tokens
            (loss, mse, var_b, l0, aux, fired, vals), grads = value_and_grad(
                self.params, x, dead, k_aux
            )
            if self.world > 1:
                grads = tree_map(lambda g: mx.distributed.all_sum(g) / self.world, grads)
                fired = mx.distributed.all_sum(fired)
            if unit_norm:  # drop the gradient component that would change a row's norm
                w = self.params["W_dec"]
                g = grads["W_dec"]
                grads["W_dec"] = g - (g * w).sum(axis=-1, keepdims=True) * w
            else:
                grads, _ = optim.clip_grad_norm(grads, 1.0)
            self.params.update(self.opt.apply_gradients(grads, self.params))
            if unit_norm:
                w = self.params["W_dec"]
                self.params["W_dec"] = w / mx.linalg.norm(w, axis=-1, keepdims=True)
            if self.cfg.architecture == "batchtopk":
                # SAELens: threshold = EMA (rate 0.01) of the smallest positive selected activation
                pos_min = mx.where(vals > 0, vals, mx.inf).min()
                t = self.stats["threshold"]
                new_t = mx.where(self.stats["step"] == 0, pos_min, 0.99 * t + 0.01 * pos_min)
                self.stats["threshold"] = mx.where(mx.isfinite(pos_min), new_t, t)
            n_tok = x.shape[0] * self.world
            self.stats["since_fired"] = mx.where(fired > 0, 0.0, self.stats["since_fired"] + n_tok)
            self.stats["fire_count"] = self.stats["fire_count"] + fired
            self.stats["step"] = self.stats["step"] + 1
            return loss, mse, var_b, l0, aux

        return step

    def step(self, x: mx.array) -> tuple[mx.array, ...]:
        k_aux = 0
        if self.tc.auxk_alpha > 0 and self.cfg.architecture != "relu":
            n_dead = int((self.stats["since_fired"] >= self.dead_tokens).sum().item())
            # only n_dead latents can contribute: round up to a power of two to bound recompiles
            k_aux = min(self.k_aux, 1 << (n_dead - 1).bit_length()) if n_dead else 0
        if k_aux not in self._steps:
            state = [self.params, self.opt.state, self.stats]
            self._steps[k_aux] = mx.compile(self._make_step(k_aux), inputs=state, outputs=state)
        return self._steps[k_aux](x * self.scale, mx.array(float(self.dead_tokens)))

    def dead_fraction(self) -> float:
        return (self.stats["since_fired"] >= self.dead_tokens).astype(mx.float32).mean().item()

    def final_params(self) -> dict:
        """Parameters for raw (unscaled) inputs: pre-activations unchanged, x̂ divided by s.

        A batchtopk SAE comes out as ``jumprelu`` with its threshold, as SAELens exports it.
        """
        s = self.scale
        p = dict(self.params)
        p["encoder"] = p["encoder"] * s
        p["W_dec"] = p["W_dec"] / s
        p["b_dec"] = p["b_dec"] / s
        if self.cfg.architecture == "batchtopk":
            p["threshold"] = mx.full((self.cfg.d_sae,), self.stats["threshold"].item())
        mx.eval(p)
        return p


def train_sae(
    source, tc: TrainConfig, *, metadata: dict | None = None, hook_layer: int | None = None,
    on_step=None,
) -> TrainResult:  # fmt: skip
    """Train on ``source`` (``.d_in``, ``.batch(n, rng)``, ``.sample(n, rng)``) and return the SAE.

    With several processes (``mlx.launch``) every process draws the same global batch and keeps
    its slice; gradients and firing counts are all-summed, so the result matches one process.
    """
    d_in = source.d_in
    d_sae = tc.d_sae_for(d_in)
    arch = tc.architecture
    if arch not in ("topk", "batchtopk", "relu"):
        raise SAEError(f"--arch {arch!r} cannot be trained; use topk, batchtopk or relu")
    if tc.k > d_sae:
        raise SAEError(f"k={tc.k} is larger than d_sae={d_sae}; lower --k or raise --expansion")
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch, k=tc.k, hook_layer=hook_layer,
                    apply_b_dec_to_input=True, metadata=dict(metadata or {}))  # fmt: skip
    steps = max(1, tc.tokens // tc.batch_size)
    rng = np.random.default_rng(tc.seed)
    trainer = Trainer(cfg, tc, source.sample(min(tc.init_samples, tc.tokens), rng), steps)
    world, rank = trainer.world, trainer.group.rank() if trainer.group is not None else 0
    if tc.batch_size % world:
        raise SAEError(f"batch size {tc.batch_size} does not split over {world} processes")
    per = tc.batch_size // world
    history, acc = [], np.zeros(4)
    late_start = steps - max(1, steps // 4)
    t0 = t_log = time.perf_counter()
    for i in range(steps):
        batch = source.batch(tc.batch_size, rng)[rank * per : (rank + 1) * per]
        if i == late_start:  # feature density over the last quarter of training
            trainer.stats["fire_count"] = mx.zeros((d_sae,))
        loss, mse, var_b, l0, aux = trainer.step(mx.array(batch, dtype=mx.float32))
        mx.eval(loss, mse, var_b, l0, aux, trainer.params, trainer.opt.state, trainer.stats)
        if not math.isfinite(loss.item()):  # stop at once: Adam spreads NaN to every weight
            raise SAEError(_divergence_message(i + 1, loss.item(), tc, d_sae, trainer.scale))
        acc += [mse.item(), var_b.item(), l0.item(), 1]
        if on_step is not None:
            on_step(i + 1, tc.batch_size)
        if (i + 1) % tc.log_every == 0 or i + 1 == steps:
            now = time.perf_counter()
            row = {
                "step": i + 1,
                "tokens": (i + 1) * tc.batch_size,
                "loss": round(loss.item(), 6),
                "fvu": round(float(acc[0] / max(acc[1], 1e-30)), 6),
                "l0": round(float(acc[2] / acc[3]), 3),
                "dead_fraction": round(trainer.dead_fraction(), 5),
                "auxk": round(aux.item(), 6),
                "tokens_per_second": round(
                    float(acc[3] * tc.batch_size / max(now - t_log, 1e-9)), 1
                ),
            }
            history.append(row)
            log.info("step %(step)d loss %(loss).4f fvu %(fvu).4f l0 %(l0).1f dead %(dead_fraction).3f "
                     "%(tokens_per_second).0f tok/s", row)  # fmt: skip
            acc[:] = 0
            t_log = now
    elapsed = time.perf_counter() - t0
    density = np.array(trainer.stats["fire_count"]) / ((steps - late_start) * tc.batch_size)
    if arch == "batchtopk":
        meta = {**cfg.metadata, "trained_as": "batchtopk", "batchtopk_k": tc.k}
        cfg = SAEConfig(**{**cfg.to_dict(), "architecture": "jumprelu", "metadata": meta})
    return TrainResult(
        cfg, trainer.final_params(), history, density, steps * tc.batch_size / elapsed
    )
