"""Check a checkpoint's tensor names and shapes against what its config.json describes.

mlx-lm's model class for the ``model_type``, built from the config, knows every parameter's
name and shape; its ``sanitize`` knows how the names on disk map to them (HF checkpoints'
``rotary_emb.inv_freq`` dropped, a tied model's ``lm_head`` dropped, per-expert tensors
stacked). Both run here on *lazy* arrays: MLX arrays are computed only when evaluated, and
nothing here evaluates one, so no weight is allocated and no tensor data is read (a 70B Llama
config builds in ~0.2 s). What mlx-lm's strict ``load_weights`` would refuse is refused here,
before a verb writes anything: a config that disagrees with the tensors (layer count, hidden
size, vocabulary, intermediate size, model_type), shapes that lie consistently (a transposed
weight, a 3-D embedding) and renamed tensors (a header byte flipped).
"""

from __future__ import annotations

import contextlib
import difflib
import io
import logging
from typing import TYPE_CHECKING

import mlx.core as mx

from mlxmerge.errors import CheckpointError

if TYPE_CHECKING:
    from mlxmerge.io.checkpoint import Checkpoint

log = logging.getLogger(__name__)

SHOWN = 3  # names listed in an error before "and N more"


def mlx_lm_model(config: dict):
    """mlx-lm's model for ``config``, parameters unevaluated (lazy); None when mlx-lm has no
    class for its ``model_type``. Raises CheckpointError when the class cannot be built from it.

    A fresh model per call: ``sanitize`` may change the model (Gemma 3 drops its ``lm_head``
    when the checkpoint has none), so one cannot serve two checkpoints."""
    from mlx_lm.utils import _get_classes

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        return None
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # olmo's module prints, then exits
            model_class, args_class = _get_classes(config)
    except (ValueError, ImportError, SystemExit):
        # an architecture mlx-lm lacks, or one needing a package it exits without (olmo)
        return None
    # Like mlx_lm.load, this draws the (lazy) random initialisation from MLX's global key.
    try:
        return model_class(args_class.from_dict(config))
    except Exception as e:  # noqa: BLE001  (mlx-lm constructors raise anything on a bad config)
        raise CheckpointError(
            f"mlx-lm cannot build a {model_type} model from this config.json "
            f"({type(e).__name__}: {e})"
        ) from None


def _describe(ckpt: Checkpoint) -> str:
    parts = [f"model_type {ckpt.model_type}"]
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size"):
        field, value = ckpt.config_field(key)
        if value is not None:
            parts.append(f"{field} {value}")
    return ", ".join(parts)


def _listed(names: list[str]) -> str:
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def check_architecture(ckpt: Checkpoint) -> None:
    """Refuse ``ckpt`` when its tensors are not what mlx-lm builds from its config.json.

    Compares the checkpoint's logical tensors (MLX-layout names, dequantized shapes; see
    ``io.layout``), mapped by the architecture's own ``sanitize``, with the parameters of
    mlx-lm's model class for the config. Nothing is checked for a checkpoint without a
    config.json or of a ``model_type`` mlx-lm lacks. Raises CheckpointError naming the file,
    the tensor, and what the config implies against what the file holds.
    """
    from mlxmerge.io.checkpoint import natural_key

    config = ckpt.config
    if not config.get("model_type"):
        return
    try:
        model = mlx_lm_model(config)
    except CheckpointError as e:
        raise CheckpointError(f"{ckpt.path / 'config.json'}: {e}") from None
    if model is None:
        return
    from mlx.utils import tree_flatten

    names = ckpt.names()
    # Stand-ins of the right shape: never evaluated, so never allocated.
    stand_ins = {n: mx.zeros(ckpt.shape(n), mx.float32) for n in names}
    try:
        mapped = model.sanitize(stand_ins) if hasattr(model, "sanitize") else stand_ins
        got = {k: tuple(v.shape) for k, v in mapped.items()}
    except Exception as e:  # noqa: BLE001  (sanitize indexes names it expects: a missing one raises)
        raise CheckpointError(
            f"{ckpt.path}: mlx-lm's {ckpt.model_type} cannot map these tensors to its parameters "
            f"({type(e).__name__}: {e}); config.json ({_describe(ckpt)}) does not describe them"
        ) from None
    # After sanitize, as mlx_lm.load does: sanitize may drop parameters (an untied head).
    want = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    unexpected = sorted(set(got) - set(want), key=natural_key)
    missing = sorted(set(want) - set(got), key=natural_key)
    if unexpected:
        name = unexpected[0]
        close = difflib.get_close_matches(name, missing, n=1, cutoff=0.9)
        hint = f" (is it {close[0]}, misspelt?)" if close else ""
        others = f"; also {_listed(unexpected[1:])}" if len(unexpected) > 1 else ""
        raise CheckpointError(
            f"{_file_of(ckpt, name)}: tensor {name}{hint} is not a parameter of the model "
            f"config.json describes ({_describe(ckpt)}){others}"
        )
    for name in sorted(got, key=natural_key):
        if got[name] != want[name]:
            raise CheckpointError(
                f"{_file_of(ckpt, name)}: tensor {name} is {got[name]} but config.json "
                f"({_describe(ckpt)}) implies {want[name]}"
            )
    if missing:
        raise CheckpointError(
            f"{ckpt.path}: config.json ({_describe(ckpt)}) implies {len(missing)} tensor(s) the "
            f"checkpoint lacks: {_listed(missing)} (a shard missing, or a config for another "
            "model)"
        )


def _file_of(ckpt: Checkpoint, name: str):
    """The file holding ``name`` (or what it is computed from); the folder when sanitize renamed it."""
    d = ckpt.derived.get(name)
    source = d.sources[0] if d is not None else name
    entry = ckpt.entries.get(source)
    return entry.file if entry is not None else ckpt.path
