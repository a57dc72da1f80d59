"""``merge`` (mergekit YAML), one command per method, ``frankenmerge`` and ``diff``."""

from __future__ import annotations

import json

import click

from mlxmerge.cli import cli
from mlxmerge.cli.models import (
    DTYPE,
    FORMAT_HELP,
    LAYOUT,
    allow_nonfinite_option,
    gguf_type_option,
    human_bytes,
)
from mlxmerge.cli.progress import progress_bar
from mlxmerge.errors import RecipeError
from mlxmerge.merge.registry import METHODS


def output_options(fn=None, *, seed: bool = True):
    """Options every merge command shares (``seed=False``: the command draws nothing at random)."""
    if fn is None:
        return lambda f: output_options(f, seed=seed)
    opts = [
        click.option("-o", "--output", type=click.Path(), help="Output folder."),
        click.option("--dry-run", is_flag=True, help="Print the plan (tensors, parameters, memory, size); compute nothing."),
        click.option("--json", "as_json", is_flag=True, help="With --dry-run: print the plan as JSON."),
        click.option("--allow-crimes", is_flag=True, help="Merge different architectures where shapes allow."),
        click.option("--out-dtype", type=DTYPE, default=None, help="Output dtype [recipe's out_dtype/dtype, else bfloat16]."),
        click.option("--format", "layout", type=LAYOUT, default="mlx", show_default=True,
                     help=FORMAT_HELP),
        gguf_type_option,
        click.option("--shard-size", default="5GB", show_default=True),
        click.option("--force", is_flag=True, help="Replace a non-empty output folder."),
    ]  # fmt: skip
    if seed:  # only where something is drawn at random (DARE, DELLA masks)
        opts.append(click.option("--seed", type=int, default=0, show_default=True,
                                 help="Seed for DARE/DELLA masks (same seed, same merge)."))  # fmt: skip
    for opt in reversed(opts):
        fn = opt(fn)
    return allow_nonfinite_option(quantize_options(fn))


def quantize_options(fn):
    """``--quantize BITS --group-size G``: write the output MLX-quantized as it streams out."""
    fn = click.option("--group-size", type=click.Choice(["32", "64", "128"]), default=None,
                      help="With --quantize: weights per scale/bias group.  [default: 64]")(fn)  # fmt: skip
    return click.option(
        "--quantize", "quantize_bits", type=click.Choice(["2", "3", "4", "5", "6", "8"]),
        default=None, help="Write the merge MLX-quantized to this many bits (mlx-lm's affine).",
    )(fn)  # fmt: skip


def quantize_kwargs(quantize_bits, group_size) -> dict:
    """The CLI's string choices as the library's ``quantize_bits``/``group_size``."""
    if group_size and not quantize_bits:  # silently unquantized output is worse than an error
        raise click.UsageError("--group-size applies to quantized output; add --quantize 4 (or 8)")
    return {"quantize_bits": int(quantize_bits) if quantize_bits else None,
            "group_size": int(group_size or 64)}  # fmt: skip


def run_recipe(
    recipe, output, dry_run, as_json, allow_crimes, out_dtype, layout, shard_size, force, seed=0,
    quantize_bits=None, group_size=None, allow_nonfinite=False, gguf_type=None,
):  # fmt: skip
    from mlxmerge.io.dtypes import parse_float_dtype
    from mlxmerge.merge.multi import is_multi_document, merge_multi
    from mlxmerge.merge.runner import merge, plan_merge, plan_summary

    if as_json and not dry_run:  # the plan is printed only by a dry run
        raise click.UsageError("--json prints the plan of --dry-run; add --dry-run")
    if is_multi_document(recipe):  # mergekit-multi: named intermediate merges, then the final
        if dry_run:
            raise click.UsageError("--dry-run plans one recipe; this file holds several documents")
        if not output:
            raise click.UsageError("give the output folder with -o/--output")
        out = merge_multi(recipe, output, allow_crimes=allow_crimes, seed=seed, layout=layout,
                          out_dtype=out_dtype, shard_size=shard_size, force=force,
                          allow_nonfinite=allow_nonfinite, gguf_type=gguf_type,
                          **quantize_kwargs(quantize_bits, group_size))  # fmt: skip
        click.echo(f"wrote {out}")
        return
    if dry_run:
        plan = plan_merge(recipe, allow_crimes=allow_crimes)
        _check_layout(plan, layout)
        dtype = parse_float_dtype(
            out_dtype or plan.recipe.out_dtype or plan.recipe.dtype or "bfloat16"
        )
        summary = plan_summary(plan, dtype)
        if quantize_bits:  # the size actually written: packed weights, scales and biases
            from mlxmerge.io import Quantization
            from mlxmerge.io.model_folder import output_size

            quant = Quantization(int(quantize_bits), int(group_size or 64))
            summary["quantization"] = quant.config()
            summary["output_bytes"] = output_size(
                [(p.name, p.shape) for p in plan.tensors], dtype, quant
            )
        need, have = summary["estimated_peak_bytes"], summary["available_memory_bytes"]
        if have is not None and need > have:
            summary["warnings"].append(
                f"the estimated peak memory ({human_bytes(need)}) exceeds the "
                f"{human_bytes(have)} available"
            )
        if output:
            from mlxmerge.io.output import disk_free

            summary["disk_free_bytes"] = disk_free(output)[1]
            if summary["output_bytes"] > summary["disk_free_bytes"]:
                summary["warnings"].append(
                    f"the output ({human_bytes(summary['output_bytes'])}) does not fit in the "
                    f"{human_bytes(summary['disk_free_bytes'])} free on the output's disk"
                )
        if as_json:
            click.echo(json.dumps(summary, indent=2))
        else:
            print_plan(summary)
        return
    if not output:
        raise click.UsageError("give the output folder with -o/--output")
    plan = plan_merge(recipe, allow_crimes=allow_crimes)
    _check_layout(plan, layout)
    with progress_bar(len(plan.tensors), "merge", "tensor") as bar:
        out = merge(plan, output, seed=seed, layout=layout,
                    out_dtype=out_dtype, shard_size=shard_size, force=force,
                    progress=lambda _n: bar.update(), allow_nonfinite=allow_nonfinite,
                    gguf_type=gguf_type, **quantize_kwargs(quantize_bits, group_size))  # fmt: skip
    click.echo(f"wrote {out}")


def _check_layout(plan, layout: str) -> None:
    # An HF export of stacked experts with no known HF names fails here, not after a pre-pass.
    if layout == "hf":
        from mlxmerge.io.layout import mlx_to_hf

        mlx_to_hf([(p.name, p.shape) for p in plan.tensors], plan.config.get("model_type"))
    if layout == "gguf":  # an architecture or tensor llama.cpp has no name for
        import mlx.core as mx

        from mlxmerge.io.gguf_write import plan_gguf
        from mlxmerge.io.model_folder import patch_config

        tensors = [(p.name, p.shape) for p in plan.tensors]
        names = [n for n, _ in tensors]
        config = patch_config(plan.config, names, mx.float32, "hf", None, plan.num_layers)
        plan_gguf(tensors, config, "f32")


def print_plan(s: dict) -> None:
    click.echo(f"method: {s['method']}" + (f" (base {s['base_model']})" if s["base_model"] else ""))
    click.echo("models: " + ", ".join(s["models"]))
    click.echo(
        f"output: {s['output_tensors']} tensors, {s['output_layers']} layers, {human_bytes(s['output_bytes'])}"
    )
    click.echo(
        f"memory: largest tensor {human_bytes(s['largest_tensor_fp32_bytes'])} in fp32, "
        f"estimated peak {human_bytes(s['estimated_peak_bytes'])}"
        + (
            f" of {human_bytes(s['available_memory_bytes'])} available"
            if s.get("available_memory_bytes")
            else ""
        )
    )
    if s.get("disk_free_bytes") is not None:
        click.echo(f"disk: {human_bytes(s['disk_free_bytes'])} free for the output")
    for g in s["groups"]:
        params = ", ".join(f"{k}={_short(v)}" for k, v in g["parameters"].items())
        click.echo(f"  {g['tensors']} ×{g['count']} {g['shape']}: {params}")
    for w in s["warnings"]:
        click.echo(f"warning: {w}")


def _short(v):
    if isinstance(v, list) and len(v) > 6:
        return "[" + ", ".join(_short(x) for x in v[:3]) + ", …, " + _short(v[-1]) + "]"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_short(x) for x in v) + "]"
    return str(v)


@cli.command("merge")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.argument("out", required=False, type=click.Path())
@output_options
def merge_cmd(recipe, out, output, **kw):
    """Run a mergekit YAML RECIPE into OUT (or -o OUT)."""
    if out and output and out != output:
        raise click.UsageError(f"two output folders given: {out} and -o {output}; give one")
    run_recipe(recipe, output or out, **kw)


# -- one command per method ------------------------------------------------------------------


def parse_value(text: str):
    """CLI value: ``0.5`` scalar, ``0,0.5,1`` gradient, ``true``/``false`` flags."""
    text = text.strip()
    if "," in text:
        return [parse_value(x) for x in text.split(",")]
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(text) if text.lstrip("-").isdigit() else float(text)
    except ValueError:
        return text


def parse_setting(values: tuple[str, ...], name: str):
    """``--t self_attn=0,1 --t 0.5`` → mergekit's [{filter, value}, ..., {value}] form."""
    if len(values) == 1 and "=" not in values[0]:
        return parse_value(values[0])
    entries = []
    for v in values:
        if "=" in v:
            flt, val = v.split("=", 1)
            entries.append({"filter": flt, "value": parse_value(val)})
        else:
            entries.append({"value": parse_value(v)})
    plain = sum("filter" not in e for e in entries)
    if plain > 1:
        raise RecipeError(
            f"--{_flag(name)}: with filters (NAME=VALUE), give at most one value without a filter "
            f"(it applies to the other tensors); got {plain}"
        )
    return entries


def _check_model_count(method: str, spec, models: list[str], base: str | None) -> None:
    """One-line errors that name the real problem with the number of models."""
    n, lo, hi = len(models), spec.min_models, spec.max_models
    if spec.base == "required" and base is None and hi == 1:
        if n != 2:
            raise RecipeError(
                f"{method} merges exactly two models, the base and one other (the first model is "
                f"the base unless --base is given); got {n}: {' '.join(models)}"
            )
        return
    if spec.base == "required" and base is None:
        raise RecipeError(
            f"{method} needs --base BASE, the model the task vectors (model − base) are taken from"
        )
    others = [m for m in models if m != base] if spec.base != "none" else models
    if len(others) < lo or (hi is not None and len(others) > hi):
        want = f"exactly {lo}" if lo == hi else (f"{lo} to {hi}" if hi else f"at least {lo}")
        extra = " besides the base" if spec.base != "none" and base else ""
        raise RecipeError(f"{method} merges {want} model(s){extra}; got {len(others)}")


def build_method_recipe(method: str, models: list[str], base: str | None, options: dict) -> dict:
    from mlxmerge.merge.registry import get_method

    spec = get_method(method)
    _check_model_count(method, spec, models, base)
    if spec.base == "required" and base is None:
        base, models = models[0], models[1:]  # `slerp A B`: A is the base, like mergekit-legacy
    recipe: dict = {"merge_method": method}
    if base:
        recipe["base_model"] = base
    entries = [{"model": m} for m in models]
    params: dict = {}
    for name in list(spec.tensor_params) + list(spec.global_params):
        values = options.get(name) or ()
        if not values:
            continue
        plain = all("=" not in v for v in values)
        if name in spec.tensor_params and len(values) > 1 and plain:
            if len(values) != len(models):
                raise RecipeError(
                    f"--{_flag(name)}: got {len(values)} values for {len(models)} models "
                    f"({' '.join(models)}); give one per model, in order, or one for all"
                )
            for e, v in zip(entries, values):
                e.setdefault("parameters", {})[name] = parse_value(v)
        elif len(values) > 1 and plain:
            raise RecipeError(
                f"--{_flag(name)} is one value for all models, got {len(values)}; "
                "a gradient over the layers is comma-separated (0,0.5,1)"
            )
        else:
            params[name] = parse_setting(values, name)
    if base and spec.base != "none" and base not in models:
        entries.insert(0, {"model": base})
    recipe["models"] = entries
    if params:
        recipe["parameters"] = params
    return recipe


def _flag(name: str) -> str:
    return name.replace("_", "-")


_METAVAR = {"number": "VALUE", "int": "N", "bool": "true|false"}


def option_help(name: str, param, per_model: bool) -> str:
    """``--help`` of one method option, from its registry Param."""
    default = param.default_text()
    text = f"mergekit `{name}`: {param.meaning} {param.range_text().capitalize()}"
    text += "; required." if default == "required" else f"; default {default}."
    if per_model:
        text += " Per model: once per model in order, or once for all."
    if param.gradient:
        text += " Gradient: 0,0.5,1. Filter: self_attn=0,1."
    return text


def _base_help(spec) -> str:
    if spec.base == "none":
        return (
            "Model mergekit lists as base_model; this method has no base (no task vectors): "
            "it is merged as one more model."
        )
    if spec.base == "optional":
        return "Optional base: with it, the task vectors (model − base) are merged."
    if spec.max_models == 1:
        return "Base model. Without --base the first of the two MODELS is the base."
    return "Base model: the task vectors (model − base) are taken from it."


def _method_command(method: str):
    from mlxmerge.merge.registry import METHODS

    spec = METHODS[method]
    params = list(spec.tensor_params) + list(spec.global_params)

    def command(models, base, output, **kw):
        opts = {p: kw.pop(p + "_opt") for p in params}
        recipe = build_method_recipe(method, list(models), base, opts)
        run_recipe(recipe, output, **kw)

    first = (
        " Without --base the first of the two MODELS is the base."
        if spec.base == "required" and spec.max_models == 1
        else ""
    )
    command.__doc__ = (
        f"{spec.summary}{first} ({spec.paper})\n\nmergekit method `{method}`; "
        "values are given as in a recipe."
    )
    for p in reversed(params):
        param = spec.params[p]
        metavar = "|".join(param.choices) if param.kind == "choice" else _METAVAR[param.kind]
        command = click.option(
            f"--{_flag(p)}", f"{p}_opt", multiple=True, metavar=metavar,
            help=option_help(p, param, p in spec.tensor_params),
        )(command)  # fmt: skip
    command = output_options(command, seed=spec.random)
    command = click.option("--base", default=None, help=_base_help(spec))(command)
    command = click.argument("models", nargs=-1, required=True)(command)
    cli.command(method.replace("_", "-"))(command)


def _register_methods():
    from mlxmerge.merge.registry import METHODS

    for method in METHODS:
        if method != "passthrough":
            _method_command(method)


_register_methods()


DARE_PARAMS = METHODS["dare_ties"].params


@cli.command("dare")
@click.argument("models", nargs=-1, required=True)
@click.option(
    "--base", required=True, help="Base model: the task vectors (model − base) are taken from it."
)
@click.option(
    "--density",
    "density",
    multiple=True,
    metavar="VALUE",
    help=option_help("density", DARE_PARAMS["density"], per_model=True),
)
@click.option(
    "--weight",
    multiple=True,
    metavar="VALUE",
    help=option_help("weight", DARE_PARAMS["weight"], per_model=True),
)
@click.option(
    "--ties/--no-ties",
    default=True,
    show_default=True,
    help="dare_ties (sign consensus) or dare_linear.",
)
@output_options
def dare(models, base, density, weight, ties, output, **kw):
    """DARE: drop delta parameters at random, rescale, then merge (dare_ties or dare_linear)."""
    method = "dare_ties" if ties else "dare_linear"
    recipe = build_method_recipe(method, list(models), base, {"density": density, "weight": weight})
    run_recipe(recipe, output, **kw)


def parse_slice(text: str) -> dict:
    model, sep, rng = text.rpartition(":")
    try:
        start, end = (int(x) for x in rng.split("-"))
    except ValueError:
        raise RecipeError(
            f"--slice {text!r}: expected MODEL:START-END (layers START..END-1)"
        ) from None
    if not sep or not model:
        raise RecipeError(f"--slice {text!r}: expected MODEL:START-END")
    return {"sources": [{"model": model, "layer_range": [start, end]}]}


@cli.command()
@click.option("--slice", "slices", multiple=True, required=True,
              help="MODEL:START-END, half-open like mergekit's layer_range; repeat in output order.")  # fmt: skip
@output_options(seed=False)
def frankenmerge(slices, output, **kw):
    """Stack layer ranges of one or more models (passthrough merge, depth up-scaling)."""
    recipe = {"merge_method": "passthrough", "slices": [parse_slice(s) for s in slices]}
    run_recipe(recipe, output, **kw)


@cli.command()
@click.argument("a")
@click.argument("b")
@click.option("--base", default=None, help="Base model: adds task-vector norms and sign conflicts.")
@click.option(
    "--plot", type=click.Path(dir_okay=False), default=None, help="Write a PNG (needs matplotlib)."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def diff(a, b, base, plot, as_json):
    """Compare A and B per layer and tensor group before merging them."""
    from mlxmerge.merge.diagnostics import diff_models, plot_diff

    with progress_bar(None, "diff", "tensor") as bar:
        report = diff_models(a, b, base, progress=lambda _n: bar.update())
    if plot:
        plot_diff(report, plot)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    cols = ["cosine", "angle_deg", "rel_diff"] + (
        ["task_norm_a", "task_norm_b", "task_cosine", "sign_conflict"] if base else []
    )
    click.echo(f"{'layer':>5} {'group':<8} " + " ".join(f"{c:>13}" for c in cols))
    for r in report["rows"] + [report["overall"]]:
        layer = "-" if r["layer"] is None else r["layer"]
        click.echo(f"{layer:>5} {r['group']:<8} " + " ".join(f"{r[c]:>13.4f}" for c in cols))
    for n in report["skipped"][:5]:
        click.echo(f"skipped {n}: shapes differ")
    for w in report["warnings"]:
        click.echo(f"warning: {w}")
