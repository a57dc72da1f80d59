"""``mlxmerge doctor``: which MLX backend and BLAS this process uses."""

from __future__ import annotations

import json
import platform
import time

import click

from mlxmerge import _blas
from mlxmerge.cli import cli


def backend_summary() -> str:
    import mlx.core as mx

    device = mx.default_device()
    blas = _blas.status["loaded"] or (
        "Accelerate" if platform.system() == "Darwin" else "reference BLAS"
    )
    return f"mlx {mx.__version__}, {device.type.name} backend, BLAS: {blas}"


def doctor_report(matmul: bool = True) -> dict:
    import mlx.core as mx

    report = {
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "metal": bool(mx.metal.is_available()),
        "cuda": bool(getattr(mx, "cuda", None) and mx.cuda.is_available()),
        "blas": _blas.status["loaded"],
        "blas_note": _blas.status["reason"],
    }
    if matmul:
        n = 1024
        a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
        mx.eval(a @ b)
        t = time.perf_counter()
        for _ in range(3):
            mx.eval(a @ b)
        report["matmul_gflops_fp32_1024"] = round(3 * 2 * n**3 / (time.perf_counter() - t) / 1e9, 1)
    return report


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def doctor(as_json: bool):
    """Show the MLX backend, BLAS and a quick matmul speed check."""
    report = doctor_report()
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for k, v in report.items():
        click.echo(f"{k:>24}: {v}")
