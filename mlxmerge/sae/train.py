"""Train an SAE on a stream of activation batches with one ``mx.compile``d step.

Default recipe (OpenAI, Gao et al. 2024, https://arxiv.org/abs/2406.04093): TopK with ReLU after
selection; encoder = decoderᵀ at init; unit-norm decoder rows, re-normalised after every step with
the gradient component parallel to each row removed first; b_dec at the geometric median; loss
``Σ‖x - x̂‖² / Σ‖x - μ‖²`` (FVU, μ from the init sample) plus AuxK
``(1/32) · ‖W_dec z_aux - e‖² / ‖e - ē‖²`` over the k_aux largest *dead* latents, e = x - x̂
detached; dead = no activation > 1e-3 for ``dead_tokens`` tokens; Adam with bias correction,
eps 6.25e-10, lr = 2e-4·√(2¹⁴ / d_sae). Inputs are scaled by one scalar so E‖x‖ = √d_in, folded
into the weights at the end, so the saved SAE reads raw activations. What differs per
architecture (activation, sparsity loss, decoder constraint, export) is its entry in
``mlxmerge.sae.kinds``.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from mlxmerge.sae.kinds import FIRE_THRESHOLD, KINDS, TRAINABLE
from mlxmerge.sae.metrics import reconstruction_metrics
from mlxmerge.sae.model import (
    SAEConfig,
    SAEError,
    decode_sparse,
    gather_pre,
    init_params,
    topk_indices,
)

log = logging.getLogger(__name__)

EVAL_ROWS = 4096  # held-out tokens evaluated at each history row

__all__ = ["FIRE_THRESHOLD", "TrainConfig", "TrainResult", "Trainer", "train_sae"]


@dataclass
class TrainConfig:
    """How to train; every field has the default of the recipe above."""

    k: int = 32  # active latents per token
    expansion: int = 8  # d_sae = expansion · d_in (ignored when d_sae is set)
    d_sae: int | None = None  # number of latents, overrides expansion
    architecture: str = "topk"  # a key of mlxmerge.sae.kinds.KINDS
    tokens: int = 2_000_000  # training tokens in total
    batch_size: int = 4096  # tokens per step (global, over all processes)
    lr: float | None = None  # None: the kind's default_lr (2e-4·√(2¹⁴/d_sae); relu 5e-5)
    adam_eps: float = 6.25e-10  # OpenAI's; MLX's default is 1e-8
    auxk_alpha: float = 1 / 32  # AuxK weight; 0 turns AuxK off
    k_aux: int | None = None  # None: min(d_in // 2, 512)
    dead_tokens: int | None = None  # dead window; None: min(10M, max(tokens // 20, 16 · batch))
    l1_coefficient: float = 5.0  # relu only: λ in λ·Σ f_i‖W_dec,i‖, warmed up over 5% of steps
    l0_coefficient: float = 1.0  # jumprelu only: λ in λ·L0 (SAELens's default), same warm-up
    jumprelu_bandwidth: float = 0.05  # jumprelu: ε of the rectangle kernel (SAELens's default)
    jumprelu_init_threshold: float = 0.01  # jumprelu: θ at init (SAELens's default)
    matryoshka_widths: tuple[int, ...] | None = None  # None: d_sae/16, /8, /4, /2, d_sae
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
        if self.architecture not in TRAINABLE:
            raise SAEError(
                f"--arch {self.architecture!r} cannot be trained; use {', '.join(TRAINABLE)}"
            )
        for name in ("jumprelu_bandwidth", "jumprelu_init_threshold"):
            if not getattr(self, name) > 0:
                flag = name.replace("_", "-")
                raise SAEError(f"--{flag} must be positive, got {getattr(self, name)!r}")

    def d_sae_for(self, d_in: int) -> int:
        return self.d_sae or self.expansion * d_in

    def widths_for(self, d_sae: int) -> tuple[int, ...]:
        """Matryoshka prefix sizes, strictly increasing, the last = d_sae (added if missing)."""
        widths = list(self.matryoshka_widths or [d_sae >> i for i in (4, 3, 2, 1) if d_sae >> i])
        if not widths or widths[-1] != d_sae:
            widths.append(d_sae)
        if (
            any(b <= a for a, b in itertools.pairwise(widths))
            or widths[0] < 1
            or widths[-1] > d_sae
        ):
            raise SAEError(f"--matryoshka-widths {','.join(map(str, widths))} must increase "
                           f"strictly from at least 1 up to d_sae={d_sae}")  # fmt: skip
        return tuple(widths)


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


def _divergence_message(step: int, loss: float, tc: TrainConfig, d_sae: int, scale: float) -> str:
    lr = tc.lr or KINDS[tc.architecture].default_lr(d_sae)
    return (
        f"training diverged at step {step}: the loss is {loss}; likely causes: the learning "
        f"rate ({lr:.3g}; try a tenth) or the input scale (activations scaled by {scale:.3g}"
        f"{'' if tc.normalize else ', normalize is off'}; non-finite or huge activations)"
    )


class Trainer:
    """Holds parameters, Adam state and firing statistics; ``step(x)`` runs one compiled update."""

    def __init__(self, cfg: SAEConfig, tc: TrainConfig, init_sample: np.ndarray, steps: int):
        self.cfg, self.tc, self.steps = cfg, tc, steps
        self.kind = KINDS[cfg.architecture]
        self.kind.check(tc, cfg.d_sae)
        self.group = mx.distributed.init() if mx.distributed.is_available() else None
        self.world = self.group.size() if self.group is not None else 1
        x0 = mx.array(init_sample, dtype=mx.float32)
        norm = mx.linalg.norm(x0, axis=-1).mean().item()
        self.scale = math.sqrt(cfg.d_in) / norm if tc.normalize and norm > 0 else 1.0
        x0 = x0 * self.scale
        b_dec = geometric_median(x0) if cfg.apply_b_dec_to_input else mx.zeros((cfg.d_in,))
        self.var_total = mx.array(((x0 - x0.mean(axis=0)) ** 2).sum(axis=-1).mean().item())
        self.params = self.kind.init_training(init_params(cfg, seed=tc.seed, b_dec=b_dec), tc)
        lr = self.kind.lr_schedule(tc.lr or self.kind.default_lr(cfg.d_sae), steps)
        self.opt = optim.Adam(learning_rate=lr, eps=tc.adam_eps, bias_correction=True)
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
        xc = x - params["b_dec"] if self.cfg.apply_b_dec_to_input else x
        pre = xc @ params["encoder"].T + params["b_enc"]  # (B, d_sae), the one dense matmul
        fw = self.kind.train_forward(self, params, x, xc, pre)
        e = x - fw.x_hat
        mse = (e**2).sum(axis=-1).mean()
        loss = (mse / self.var_total if self.kind.normalized_mse else mse) + fw.penalty
        aux = mx.array(0.0)
        if k_aux:
            aux = self._auxk(params, xc, pre, mx.stop_gradient(e), dead, k_aux)
            loss = loss + self.tc.auxk_alpha * aux
        var_b = ((x - x.mean(axis=0)) ** 2).sum(axis=-1).mean()
        return loss, mse, var_b, fw.l0, aux, mx.stop_gradient(fw.fired), mx.stop_gradient(fw.acts)

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
        unit_norm, clip = self.kind.unit_norm_decoder, self.kind.clip_grad_norm

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
            if clip is not None:
                grads, _ = optim.clip_grad_norm(grads, clip)
            self.params.update(self.opt.apply_gradients(grads, self.params))
            if unit_norm:
                w = self.params["W_dec"]
                self.params["W_dec"] = w / mx.linalg.norm(w, axis=-1, keepdims=True)
            self.kind.after_step(self, vals)
            n_tok = x.shape[0] * self.world
            self.stats["since_fired"] = mx.where(fired > 0, 0.0, self.stats["since_fired"] + n_tok)
            self.stats["fire_count"] = self.stats["fire_count"] + fired
            self.stats["step"] = self.stats["step"] + 1
            return loss, mse, var_b, l0, aux

        return step

    def step(self, x: mx.array) -> tuple[mx.array, ...]:
        k_aux = 0
        if self.tc.auxk_alpha > 0 and self.kind.auxk:
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

        In the exported kind's form (``final_cfg``): the batchtopk kinds come out as ``jumprelu``
        with their EMA threshold, as SAELens exports them.
        """
        s = self.scale
        p = self.kind.export(self, dict(self.params))
        p["encoder"] = p["encoder"] * s
        p["W_dec"] = p["W_dec"] / s
        p["b_dec"] = p["b_dec"] / s
        mx.eval(p)
        return p

    def final_cfg(self) -> SAEConfig:
        """The config the SAE is saved with; a kind saved as another says so in the metadata."""
        cfg, kind = self.cfg, self.kind
        if kind.exported_kind() is kind:
            return cfg
        meta = {**cfg.metadata, **kind.export_metadata(self)}
        return SAEConfig(**{**cfg.to_dict(), "architecture": kind.exported_kind().name,
                            "metadata": meta})  # fmt: skip


def train_sae(
    source, tc: TrainConfig, *, metadata: dict | None = None, hook_layer: int | None = None,
    on_step=None, held_out: np.ndarray | None = None,
) -> TrainResult:  # fmt: skip
    """Train on ``source`` (``.d_in``, ``.batch(n, rng)``, ``.sample(n, rng)``) and return the SAE.

    ``held_out (n, d_in)``: activations never trained on; at every history row the SAE as it
    would be saved is evaluated on (up to ``EVAL_ROWS`` of) them: ``heldout_fvu``, ``heldout_l0``
    and ``heldout_dead_fraction`` (latents that never exceed 1e-3 on those rows).

    With several processes (``mlx.launch``) every process draws the same global batch and keeps
    its slice; gradients and firing counts are all-summed, so the result matches one process.
    """
    d_in = source.d_in
    d_sae = tc.d_sae_for(d_in)
    arch = tc.architecture
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
    held_eval = None if held_out is None else held_out[:EVAL_ROWS]
    late_start = steps - max(1, steps // 4)
    t0 = t_log = time.perf_counter()
    eval_s = 0.0
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
            if held_out is not None:
                m = reconstruction_metrics(trainer.final_cfg(), trainer.final_params(), held_eval)
                row.update({"heldout_fvu": round(m["fvu"], 6), "heldout_l0": round(m["l0"], 3),
                            "heldout_dead_fraction": round(m["dead_fraction"], 5)})  # fmt: skip
            history.append(row)
            log.info("step %(step)d loss %(loss).4f fvu %(fvu).4f l0 %(l0).1f dead %(dead_fraction).3f "
                     "%(tokens_per_second).0f tok/s", row)  # fmt: skip
            acc[:] = 0
            t_log = time.perf_counter()  # the held-out evaluation is not training time
            eval_s += t_log - now
    elapsed = time.perf_counter() - t0 - eval_s
    density = np.array(trainer.stats["fire_count"]) / ((steps - late_start) * tc.batch_size)
    return TrainResult(
        trainer.final_cfg(),
        trainer.final_params(),
        history,
        density,
        steps * tc.batch_size / elapsed,
    )
