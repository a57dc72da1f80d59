"""SAELens v6 folders: ``cfg.json`` + ``sae_weights.safetensors`` (+ ``sparsity.safetensors``).

Written so that ``sae_lens.SAE.load_from_disk(folder)`` takes the v6 path (``metadata.sae_lens_version``
present, explicit ``k`` and ``apply_b_dec_to_input``, no normalisation left to apply). Tensors:
``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]`` and, for
``jumprelu``, ``threshold [d_sae]``. Reads the same format back, including pre-v6 folders.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxmerge import __version__
from mlxmerge.io.output import atomic_folder, check_free_space, check_output
from mlxmerge.io.safetensors_file import read_header
from mlxmerge.io.text import read_text
from mlxmerge.sae.kinds import FROM_SAELENS, KINDS
from mlxmerge.sae.model import SAEConfig, SAEError

SAE_LENS_VERSION = (
    "6.18.0"  # the cfg layout we write; any value >= 6.0.0 selects SAELens's v6 loader
)
ACTIVATION_SCALER_NAME = "activation_scaler.json"  # SAELens training checkpoints
CFG_NAME, WEIGHTS_NAME, SPARSITY_NAME = (
    "cfg.json",
    "sae_weights.safetensors",
    "sparsity.safetensors",
)


def hook_name(layer: int) -> str:
    """TransformerLens name of block ``layer``'s output (= HF ``hidden_states[layer + 1]``)."""
    return f"blocks.{layer}.hook_resid_post"


def cfg_dict(cfg: SAEConfig) -> dict:
    """The cfg.json content: SAELens v6 keys, with mlxmerge's own record inside ``metadata``."""
    kind = KINDS[cfg.architecture]
    meta = {
        "sae_lens_version": SAE_LENS_VERSION,
        "sae_lens_training_version": None,
        "model_name": cfg.metadata.get("model_name"),
        "hook_name": hook_name(cfg.hook_layer) if cfg.hook_layer is not None else None,
        "hook_head_index": None,
        "context_size": cfg.metadata.get("context_size"),
        "prepend_bos": cfg.metadata.get("prepend_bos", True),
        "dataset_path": cfg.metadata.get("dataset_path"),
        "seqpos_slice": [None],
        "model_from_pretrained_kwargs": {},
        "exclude_special_tokens": cfg.metadata.get("exclude_special_tokens", True),
        "neuronpedia_id": None,
    }
    meta.update({k: v for k, v in cfg.metadata.items() if k not in meta})
    meta["trained_with"] = f"mlxmerge {__version__}"
    out = {
        "architecture": kind.saelens,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": "none",  # any input scaling is folded into the weights
        "reshape_activations": "none",
        "metadata": meta,
    }
    out.update(kind.cfg_fields(cfg))
    return out


def save_sae(
    folder: str | os.PathLike, cfg: SAEConfig, params: dict, *, sparsity: np.ndarray | None = None,
    extra_files: dict[str, bytes | str] | None = None, force: bool = False,
) -> Path:  # fmt: skip
    """Write an SAELens v6 folder atomically; ``sparsity`` is per-latent firing density (0..1)."""
    target = check_output(folder, force=force)
    tensors = {
        "W_enc": params["encoder"].T,
        "b_enc": params["b_enc"],
        "W_dec": params["W_dec"],
        "b_dec": params["b_dec"],
    }
    for name in KINDS[cfg.architecture].extra_tensors:
        tensors[name] = params[name]
    tensors = {k: mx.contiguous(v.astype(mx.float32)) for k, v in tensors.items()}
    check_free_space(target, sum(v.nbytes for v in tensors.values()), "the SAE")
    with atomic_folder(target, force=force) as tmp:
        (tmp / CFG_NAME).write_text(json.dumps(cfg_dict(cfg), indent=2))
        mx.save_safetensors(str(tmp / WEIGHTS_NAME), tensors, metadata={"format": "pt"})
        if sparsity is not None:
            log_density = np.log10(np.maximum(np.asarray(sparsity, np.float64), 1e-10))
            mx.save_safetensors(
                str(tmp / SPARSITY_NAME), {"sparsity": mx.array(log_density.astype(np.float32))}
            )
        for name, content in (extra_files or {}).items():
            path = tmp / name
            path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return target


def residual_block(hook: str) -> int | None:
    """The block whose output a TransformerLens hook name reads, or None if it is not that.

    ``blocks.{i}.hook_resid_post`` is block i's output; ``blocks.{i}.hook_resid_pre`` is block
    i's input, which is block i-1's output (the same tensor), so it maps to i-1. The embedding
    output (``blocks.0.hook_resid_pre``) and non-residual hooks (``hook_mlp_out``, ``hook_z``, ...)
    give None: mlxmerge captures block outputs only."""
    m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(post|pre)", hook)
    if not m:
        return None
    i = int(m.group(1))
    return i if m.group(2) == "post" else (i - 1 if i > 0 else None)


def load_sae(folder: str | os.PathLike) -> tuple[SAEConfig, dict]:
    """Read an SAELens folder (v6 or older) into ``(SAEConfig, params)``, checking every tensor."""
    folder = Path(folder).expanduser()
    cfg_path, w_path = folder / CFG_NAME, folder / WEIGHTS_NAME
    for path in (cfg_path, w_path):
        if not path.is_file():
            raise SAEError(
                f"{folder}: no {path.name}; an SAE folder holds {CFG_NAME} and {WEIGHTS_NAME}"
            )
    try:
        raw = json.loads(read_text(cfg_path, "SAE config", SAEError))
    except json.JSONDecodeError as e:
        raise SAEError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise SAEError(f"{cfg_path}: not a JSON object")
    meta = dict(raw.get("metadata") or {})
    if "sae_lens_version" not in meta and "sae_lens_version" not in raw:
        raw, meta = _legacy_cfg(raw)
    arch_name = raw.get("architecture", "standard")
    if arch_name not in FROM_SAELENS:
        raise SAEError(f"{cfg_path}: architecture {arch_name!r} is not supported "
                       f"(supported: {', '.join(FROM_SAELENS)})")  # fmt: skip
    _check_maths_fields(raw, arch_name, cfg_path)
    for key in ("d_in", "d_sae"):
        if not isinstance(raw.get(key), int):
            raise SAEError(f"{cfg_path}: {key} is missing or not an integer")
    hook_layer = residual_block(meta.get("hook_name") or "")
    arch = FROM_SAELENS[arch_name]
    kind = KINDS[arch]
    cfg = SAEConfig(
        d_in=raw["d_in"], d_sae=raw["d_sae"], architecture=arch,
        k=int(raw.get("k", 100)) if kind.uses_k else int(raw.get("k", 1) or 1),
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
        hook_layer=hook_layer, metadata=meta,
    )  # fmt: skip
    read_header(w_path)  # a truncated or malformed file: one line naming it, before mx.load
    weights = mx.load(str(w_path))
    expected = {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,),
                "W_dec": (cfg.d_sae, cfg.d_in), "b_dec": (cfg.d_in,)}  # fmt: skip
    for name in kind.extra_tensors:
        expected[name] = (cfg.d_sae,)
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise SAEError(f"{w_path}: unexpected tensors {extra} for architecture {arch_name!r}")
    for name, shape in expected.items():
        if name not in weights:
            raise SAEError(f"{w_path}: tensor {name} is missing")
        if tuple(weights[name].shape) != shape:
            raise SAEError(f"{w_path}: {name} is {tuple(weights[name].shape)}, expected {shape} "
                           f"from d_in={cfg.d_in}, d_sae={cfg.d_sae}")  # fmt: skip
    params = {
        "encoder": mx.contiguous(weights["W_enc"].astype(mx.float32).T),
        "b_enc": weights["b_enc"].astype(mx.float32),
        "W_dec": weights["W_dec"].astype(mx.float32),
        "b_dec": weights["b_dec"].astype(mx.float32),
    }
    for name in kind.extra_tensors:
        params[name] = weights[name].astype(mx.float32)
    if arch == "topk" and raw.get("rescale_acts_by_decoder_norm"):
        params = fold_decoder_norm(params, w_path)
        cfg.metadata["rescale_acts_by_decoder_norm"] = "folded into W_enc, b_enc and W_dec"
    if raw.get("normalize_activations") == "expected_average_only_in":
        # After the decoder-norm fold: that one uses the stored (scaled-space) decoder norms.
        scale = _scaling_factor(folder, cfg_path)
        if scale is not None:
            params = {**params, "encoder": params["encoder"] * scale,
                      "W_dec": params["W_dec"] / scale, "b_dec": params["b_dec"] / scale}  # fmt: skip
            cfg.metadata["activation_scaling_factor"] = f"{scale} folded into W_enc, W_dec, b_dec"
    mx.eval(params)
    return cfg, params


# cfg.json fields SAELens's inference forward reads, with the values mlxmerge reproduces.
# Any other value would change the maths, so it is refused by name rather than ignored.
_FLOAT_DTYPES = ("float32", "float16", "bfloat16", "torch.float32", "torch.float16",
                 "torch.bfloat16")  # fmt: skip
_SUPPORTED_VALUES = {
    "normalize_activations": ("none", "expected_average_only_in", None),  # the latter: see below
    "reshape_activations": ("none", None),
    "finetuning_scaling_factor": (False, None),  # pre-v6: a learnt per-latent scale
    "activation_fn_str": ("relu", "topk", None),  # pre-v6
    "activation_fn": ("relu", "topk", None),  # pre-v6
    "dtype": (*_FLOAT_DTYPES, None),
}


def _check_maths_fields(raw: dict, arch_name: str, cfg_path: Path) -> None:
    """Refuse, by name, any cfg.json value that changes SAELens's forward and is not reproduced.

    Reproduced: architecture (topk, standard, jumprelu), d_in, d_sae, k, apply_b_dec_to_input,
    rescale_acts_by_decoder_norm (topk; SAELens ignores it for the others) and any float dtype
    (the maths runs in float32 whatever the stored dtype, as SAELens does for float32 folders).
    """
    for key, allowed in _SUPPORTED_VALUES.items():
        value = raw.get(key)
        if isinstance(value, str) and key != "dtype":
            value = value or None
        if value not in allowed:
            shown = ", ".join(repr(a) for a in allowed if a is not None)
            raise SAEError(
                f"{cfg_path}: {key}={value!r} changes the SAE's forward pass and mlxmerge does not "
                f"implement it (supported: {shown})"
            )
    if arch_name == "topk" and not isinstance(raw.get("rescale_acts_by_decoder_norm", False), bool):
        raise SAEError(f"{cfg_path}: rescale_acts_by_decoder_norm must be true or false")


def _scaling_factor(folder: Path, cfg_path: Path) -> float | None:
    """The input scale of a SAELens training checkpoint (``normalize_activations:
    expected_average_only_in``): SAELens trains on ``s·x`` and keeps ``s`` in activation_scaler.json
    until the final save folds it (W_enc·s, W_dec/s, b_dec/s). None: no scale was estimated."""
    path = folder / ACTIVATION_SCALER_NAME
    try:
        s = json.loads(read_text(path, ACTIVATION_SCALER_NAME, SAEError))["scaling_factor"]
    except (SAEError, json.JSONDecodeError, KeyError, TypeError):
        raise SAEError(
            f"{cfg_path}: normalize_activations='expected_average_only_in' needs the input scale "
            f"from {ACTIVATION_SCALER_NAME} (a SAELens training checkpoint), which is missing or "
            "unreadable; the final SAELens save folds it and writes 'none'"
        ) from None
    if s is not None and not (isinstance(s, (int, float)) and s > 0):
        raise SAEError(f"{path}: scaling_factor must be a positive number, got {s!r}")
    return None if s is None else float(s)


def fold_decoder_norm(params: dict, where: Path | str = "W_dec") -> dict:
    """SAELens's TopK with ``rescale_acts_by_decoder_norm`` as a plain TopK with folded weights.

    SAELens: ``pre = ((x − b_dec) W_enc + b_enc) · n``, ``z = TopK(pre)``, ``x̂ = (z / n) W_dec +
    b_dec`` with ``n = ‖W_dec‖`` per latent row. Scaling the encoder rows and ``b_enc`` by ``n``
    and dividing the decoder rows by it gives the same ``z`` and ``x̂`` with the plain forward
    (SAELens's own ``fold_W_dec_norm``). A zero row would divide by zero (NaN in SAELens): refused.
    """
    n = mx.linalg.norm(params["W_dec"], axis=-1)  # (d_sae,)
    dead = np.flatnonzero(np.array(n) == 0)
    if dead.size:
        raise SAEError(
            f"{where}: W_dec rows {dead[:5].tolist()} have zero norm; with "
            "rescale_acts_by_decoder_norm the decoder is divided by its row norms"
        )
    return {
        **params,
        "encoder": params["encoder"] * n[:, None],
        "b_enc": params["b_enc"] * n,
        "W_dec": params["W_dec"] / n[:, None],
    }


def load_sparsity(folder: str | os.PathLike) -> np.ndarray | None:
    """Per-latent log10 firing density from ``sparsity.safetensors``, if the folder has one."""
    path = Path(folder) / SPARSITY_NAME
    return np.array(mx.load(str(path))["sparsity"]) if path.is_file() else None


def _legacy_cfg(raw: dict) -> tuple[dict, dict]:
    """Pre-v6 cfg: ``hook_point`` → ``hook_name``; topk's k from ``activation_fn_kwargs``."""
    raw = dict(raw)
    if raw.get("activation_fn") == "topk" or raw.get("activation_fn_str") == "topk":
        raw.setdefault("architecture", "topk")
        raw.setdefault("k", (raw.get("activation_fn_kwargs") or {}).get("k", 100))
    meta = {"hook_name": raw.get("hook_name", raw.get("hook_point")),
            "model_name": raw.get("model_name")}  # fmt: skip
    return raw, meta
