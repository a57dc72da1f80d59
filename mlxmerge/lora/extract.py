"""Extract a LoRA adapter from a fine-tune: per linear layer, a truncated SVD of ``W_ft − W_base``.

As ``mergekit-extract-lora`` does, in float32 with MLX, one tensor at a time: memory stays at a few
copies of the largest tensor plus the adapter being built (``r·(in+out)`` per module).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import mlx.core as mx

from mlxmerge.errors import MlxmergeError
from mlxmerge.io import Checkpoint, layer_index, open_checkpoint
from mlxmerge.io.dtypes import parse_float_dtype
from mlxmerge.io.finite import FiniteGuard
from mlxmerge.io.output import atomic_folder, check_free_space, check_output
from mlxmerge.lora.svd import SVD_METHODS, captured, low_rank
from mlxmerge.lora.write import FORMATS, write_mlx_adapter, write_peft_adapter

log = logging.getLogger(__name__)


def is_linear(name: str, shape: tuple[int, ...]) -> bool:
    """A decoder layer's 2-D weight: the matrices mlx-lm's LoRA wraps (norms are 1-D)."""
    return name.endswith(".weight") and len(shape) == 2 and layer_index(name) is not None


def is_embedding_or_head(name: str) -> bool:
    return name.endswith(("embed_tokens.weight", "lm_head.weight", "wte.weight"))


def lora_targets(ckpt: Checkpoint, modules: Sequence[str] | None) -> list[str]:
    """Linear weights to factor; ``modules`` keeps those whose module path ends with one of them
    (``q_proj``, ``self_attn.o_proj``)."""
    linear = [n for n in ckpt.names() if is_linear(n, ckpt.shape(n))]
    if not modules:
        return linear
    picked = []
    for m in modules:
        hits = [n for n in linear if ("." + n.removesuffix(".weight")).endswith("." + m)]
        if not hits:
            known = sorted({n.removesuffix(".weight").rsplit(".", 1)[-1] for n in linear})
            raise MlxmergeError(
                f"--modules {m}: matches no linear layer of {ckpt.reference}; it has {', '.join(known)}"
            )
        picked += hits
    return [n for n in linear if n in set(picked)]


def _check_pair(ft: Checkpoint, base: Checkpoint) -> None:
    for a, b in ((ft, base), (base, ft)):
        missing = [n for n in a.names() if n not in b]
        if missing:
            raise MlxmergeError(
                f"{a.reference} has {missing[0]}, which {b.reference} lacks; is "
                f"{ft.reference} really fine-tuned from {base.reference}?"
            )
    for n in ft.names():
        if ft.shape(n) != base.shape(n):
            raise MlxmergeError(
                f"tensor {n} is {ft.shape(n)} in {ft.reference} but {base.shape(n)} in "
                f"{base.reference}; the models must share an architecture"
            )


def extract_lora(
    finetuned: str, base: str, output: str | Path, *, rank: int | None = None,
    energy: float | None = None, max_rank: int | None = None, format: str = "mlx",
    modules: Sequence[str] | None = None, dtype: str = "float32", svd: str = "auto",
    force: bool = False, progress: Callable[[str], None] | None = None,
) -> dict:  # fmt: skip
    """Write a LoRA adapter approximating ``finetuned − base`` and return a report.

    Rank: a fixed ``rank``, or with ``energy`` (0, 1] the smallest rank keeping that share of each
    task vector's ``Σ s²`` (capped by ``max_rank``). ``format``: ``mlx`` (what
    ``mlx_lm.load(base, adapter_path=...)`` reads) or ``peft`` (``PeftModel.from_pretrained``).
    Changed embeddings and ``lm_head`` are reported; PEFT output stores them as ``modules_to_save``.
    ``svd``: ``exact``, ``randomized`` or ``auto`` (randomized for small ranks; see
    ``mlxmerge.lora.svd.low_rank``). The report lists per module: ``rank``, ``energy`` (share
    of ``Σ s²`` kept) and ``rel_delta`` (‖ΔW‖/‖W_base‖), plus each spectrum as ``captured``
    shares for plotting.
    Raises ``MlxmergeError`` on mismatched models, bad options or an unusable output folder, and
    ``NonFiniteError`` naming the model and tensor when an input or a factor holds NaN/Inf (no
    SVD of such a matrix means anything, so there is no --allow-nonfinite here).
    """
    if format not in FORMATS:
        raise MlxmergeError(f"unknown adapter format {format!r}; use mlx or peft")
    if (rank is None) == (energy is None):
        raise MlxmergeError("give exactly one of --rank R or --energy SHARE")
    if rank is not None and rank < 1:
        raise MlxmergeError(f"--rank must be at least 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise MlxmergeError(
            f"--energy is a share of squared singular values in (0, 1], got {energy}"
        )
    if svd not in SVD_METHODS:
        raise MlxmergeError(f"unknown SVD method {svd!r}; use {', '.join(SVD_METHODS)}")
    if svd == "randomized" and rank is None and max_rank is None:
        raise MlxmergeError("--svd randomized needs --rank or --max-rank (how many values to find)")
    out_dtype = parse_float_dtype(dtype)
    ft, bs = open_checkpoint(finetuned), open_checkpoint(base)
    _check_pair(ft, bs)
    targets = lora_targets(bs, modules)
    if not targets:
        raise MlxmergeError(f"{base}: no linear layers inside decoder layers to extract")
    target = check_output(output, [finetuned, base], force=force)

    factors: dict[str, tuple[mx.array, mx.array]] = {}
    rows, spectra = [], {}
    guard = FiniteGuard(False, "extract-lora", hint="")

    def name_nonfinite(name: str, total: mx.array) -> None:
        # A NaN/Inf entry in either model makes the squared sum of their difference non-finite:
        # only then are the two tensors read again, to name the one at fault before any SVD.
        if math.isfinite(total.item()):
            return
        for ref, ck in ((str(base), bs), (str(finetuned), ft)):
            x = ck.get(name, mx.float32)
            mx.eval(x)
            guard.check_input(ref, name, x)

    for name in targets:
        w = bs.get(name, mx.float32)
        delta = ft.get(name, mx.float32) - w
        total = mx.sum(mx.square(delta))
        mx.eval(delta, total)
        name_nonfinite(name, total)
        lr = low_rank(delta, rank=rank, energy=energy, max_rank=max_rank, method=svd)
        r = lr.b.shape[1]
        b, a = lr.b.astype(out_dtype), lr.a.astype(out_dtype)
        shares = captured(lr.s, lr.total)
        w_norm = mx.linalg.norm(w.reshape(-1))
        mx.eval(b, a, shares, w_norm)
        guard.check_output(f"{name.removesuffix('.weight')}.lora_b", b)
        guard.check_output(f"{name.removesuffix('.weight')}.lora_a", a)
        module = name.removesuffix(".weight")
        factors[module] = (b, a)
        spectra[module] = shares.tolist()
        d_norm = math.sqrt(lr.total)
        rows.append({"module": module, "shape": list(bs.shape(name)), "rank": r,
                     "energy": spectra[module][r - 1], "delta_norm": d_norm,
                     "rel_delta": d_norm / max(w_norm.item(), 1e-30)})  # fmt: skip
        del w, delta, lr
        mx.clear_cache()
        if progress:
            progress(name)

    others, full = [], {}
    covered = set(targets)
    for name in (n for n in bs.names() if n not in covered):
        w = bs.get(name, mx.float32)
        total = mx.sum(mx.square(ft.get(name, mx.float32) - w))
        name_nonfinite(name, total)
        d = math.sqrt(total.item())
        if d > 0:
            row = {
                "tensor": name,
                "rel_delta": d / max(mx.linalg.norm(w.reshape(-1)).item(), 1e-30),
            }
            keep = format == "peft" and is_embedding_or_head(name)
            row["written"] = "modules_to_save" if keep else None
            if keep:
                full[name] = ft.get(name)
            others.append(row)
            log.warning("%s changed (%.3g relative) but is not LoRA-covered%s", name,
                        row["rel_delta"], "; written whole" if keep else "")  # fmt: skip
        mx.clear_cache()
        if progress:
            progress(name)

    if not full and all(r["delta_norm"] == 0 for r in rows):
        # An all-zero adapter is never what was meant: the same model twice, or the wrong pair.
        which = "selected linear layer (--modules)" if modules else "linear layer"
        changed = f"; {len(others)} other tensors differ" if others else ""
        raise MlxmergeError(
            f"{finetuned} and {base} are identical in every {which}{changed}: nothing to extract"
        )
    size = sum(b.nbytes + a.nbytes for b, a in factors.values()) + sum(
        math.prod(x.shape) * out_dtype.size for x in full.values()
    )
    check_free_space(target, size, "the adapter")
    with atomic_folder(target, force=force) as tmp:
        if format == "mlx":
            write_mlx_adapter(tmp, factors, num_layers=bs.num_layers, base_model=str(base),
                              dtype=out_dtype)  # fmt: skip
        else:
            write_peft_adapter(tmp, factors, base_model=str(base), full=full, dtype=out_dtype,
                               model_type=bs.model_type)  # fmt: skip
    ranks = [r["rank"] for r in rows]
    return {
        "output": str(target), "format": format, "base": str(base), "finetuned": str(finetuned),
        "rank": rank, "energy": energy, "max_rank": max_rank,
        "max_rank_used": max(ranks), "mean_rank": sum(ranks) / len(ranks),
        "parameters": sum(r["rank"] * sum(r["shape"]) for r in rows),
        "modules": rows, "not_covered": others, "captured": spectra,
    }  # fmt: skip
