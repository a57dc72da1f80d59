"""``inspect`` and ``convert``: look at a checkpoint, rewrite it."""

from __future__ import annotations

import json

import click

from mlxmerge.cli import cli
from mlxmerge.cli.progress import progress_bar
from mlxmerge.io import human_bytes

DTYPE = click.Choice(["bfloat16", "float16", "float32"])
LAYOUT = click.Choice(["mlx", "hf", "gguf"])
FORMAT_HELP = (
    "mlx: what mlx_lm.load reads; hf: what transformers reads; gguf: one file llama.cpp runs."
)
# io.gguf_write's GGUF_TYPES, then its LLAMA_CPP_TYPES (made by llama.cpp's quantizer)
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1",
              "q4_k_m", "q5_k_m", "q6_k")  # fmt: skip


def gguf_type_option(fn):
    """``--gguf-type``: the tensor type of a ``--format gguf`` output (io.gguf_write.GGUF_TYPES)."""
    return click.option(
        "--gguf-type", type=click.Choice(GGUF_TYPES, case_sensitive=False), default=None,
        help="With --format gguf: the weights' type (norms stay f32; k-quants need "
        "llama-cpp-python).  [default: q8_0]",
    )(fn)  # fmt: skip


def allow_nonfinite_option(fn):
    """``--allow-nonfinite``, shared by every command that reads or writes weights."""
    return click.option(
        "--allow-nonfinite", is_flag=True,
        help="Warn instead of stopping when a tensor read or written holds NaN or Inf.",
    )(fn)  # fmt: skip


def human_count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


@cli.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--check", is_flag=True,
              help="Also scan every tensor for NaN/Inf (reads the weights; exit 1 if any).")  # fmt: skip
def inspect(model: str, as_json: bool, check: bool):
    """Describe MODEL (folder, .safetensors or .gguf file, or hub id) from its headers and config.

    A GGUF file's per-tensor types (Q4_K, F16, ...) are listed under "gguf" in --json."""
    from mlxmerge.inspect import inspect_model

    info = inspect_model(model, check=check)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        _fail_on_nonfinite(info)
        return
    if info.get("kind") == "adapter":
        rows = [("path", info["path"]), ("LoRA adapter", f"{info['format']} format"),
                ("base model", info["base_model"] or "not recorded"),
                ("modules", f"{', '.join(info['modules'])} ({info['tensors']} tensors)"),
                ("rank", ", ".join(map(str, info["ranks"]))),
                ("scale", ", ".join(f"{s:g}" for s in info["scales"])),
                ("parameters", human_count(info["parameters"])),
                ("saved whole", ", ".join(info["replaced"]) or "none")]  # fmt: skip
        for k, v in rows:
            click.echo(f"{k:>16}: {v}")
        _print_check(info, check)
        return
    q = info["quantization"]
    rows = [
        ("path", info["path"]),
        ("architecture", f"{info['architecture']} (model_type {info['model_type']})"),
        ("layers", info["layers"]),
        ("hidden size", _with_field(info["hidden_size"], info["hidden_size_field"], "hidden_size")),
        ("vocab size", info["vocab_size"]),
        ("parameters", f"{human_count(info['parameters'])} in {info['tensors']} tensors"),
        ("dtypes", ", ".join(f"{k} ×{v}" for k, v in info["dtypes"].items())),
        (
            "quantization",
            f"{q['bits']}-bit, group size {q['group_size']} ({q['mode']})" if q else "none",
        ),
        *_gguf_rows(info),
        ("tied embeddings", "yes" if info["tied_embeddings"] else "no"),
        ("shards", info["shards"]),
        ("size on disk", human_bytes(info["size_on_disk"])),
    ]
    if info["config_mismatch"]:
        rows.append(("config mismatch", info["config_mismatch"]))
    for k, v in rows:
        click.echo(f"{k:>16}: {v}")
    _print_check(info, check)


def _gguf_rows(info: dict) -> list[tuple[str, str]]:
    if "gguf" not in info:
        return []
    types = sorted(info["gguf"]["types"].items(), key=lambda kv: -kv[1])
    return [("GGUF types", ", ".join(f"{k} ×{v}" for k, v in types) + " (read dequantized)")]


def _print_check(info: dict, check: bool) -> None:
    if check:
        bad = info["nonfinite"]
        click.echo(
            f"{'non-finite':>16}: {len(bad)} tensor(s)" if bad else f"{'non-finite':>16}: none"
        )
        for b in bad:
            click.echo(f"{'':>16}  {b['tensor']}: {b['nan']} NaN, {b['inf']} Inf")
    _fail_on_nonfinite(info)


def _fail_on_nonfinite(info: dict) -> None:
    if info.get("nonfinite"):
        raise click.exceptions.Exit(1)


def _with_field(value, field: str | None, standard: str) -> str:
    # Say which config key a value came from when the architecture names it its own way.
    return f"{value} ({field})" if field and field != standard else str(value)


@cli.command()
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output folder.")
@click.option("--dtype", type=DTYPE, default="bfloat16", show_default=True)
@click.option("--format", "layout", type=LAYOUT, default="mlx", show_default=True,
              help=FORMAT_HELP)  # fmt: skip
@gguf_type_option
@click.option("--quantize", "quantize_bits", type=click.Choice(["2", "3", "4", "5", "6", "8"]),
              default=None, help="Quantize weights for MLX (bits).")  # fmt: skip
@click.option("--group-size", type=int, default=64, show_default=True)
@click.option(
    "--shard-size", default="5GB", show_default=True, help="Max bytes per shard (5GB, 500MB)."
)
@click.option("--force", is_flag=True, help="Replace a non-empty output folder.")
@allow_nonfinite_option
def convert(
    model, output, dtype, layout, gguf_type, quantize_bits, group_size, shard_size, force,
    allow_nonfinite,
):  # fmt: skip
    """Rewrite MODEL with another dtype, layout or quantization (dequantizes MLX inputs)."""
    from mlxmerge.convert import convert as run
    from mlxmerge.io import open_checkpoint

    ckpt = open_checkpoint(model)
    total = len(ckpt.names())
    with progress_bar(total, "convert", "tensor") as bar:
        out = run(model, output, dtype=dtype, layout=layout,
                  quantize_bits=int(quantize_bits) if quantize_bits else None,
                  group_size=group_size, shard_size=shard_size, force=force,
                  progress=lambda _name: bar.update(), allow_nonfinite=allow_nonfinite,
                  gguf_type=gguf_type)  # fmt: skip
    click.echo(f"wrote {out}")
    if quantize_bits and layout == "mlx":
        from mlxmerge.io.gguf_read import carried_tensors

        carried = len(carried_tensors(ckpt, int(quantize_bits), group_size))
        if carried:
            click.echo(f"{carried} GGUF tensors' blocks carried into MLX {quantize_bits}-bit "
                       "quantization (no float round trip); the rest through mx.quantize")  # fmt: skip
