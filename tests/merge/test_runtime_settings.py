"""Process-wide settings a merge changes are set back afterwards, and merges run in any thread."""

import threading

import pytest

from mlxmerge import _malloc
from mlxmerge.merge.methods import row_blocks
from mlxmerge.merge.runner import merge


def test_malloc_settings_are_set_back_even_when_the_merge_fails(monkeypatch):
    calls = []
    monkeypatch.setattr(_malloc, "_mallopt", lambda: lambda p, v: calls.append((p.value, v.value)))
    with pytest.raises(RuntimeError), _malloc.reuse_freed_memory():
        with _malloc.reuse_freed_memory():  # a second merge overlapping (another thread)
            pass
        assert len(calls) == 3  # tuned once; not set back while the outer merge runs
        raise RuntimeError("interrupted")
    tuned, restored = calls[:3], calls[3:]
    assert dict(tuned)[_malloc.M_MMAP_THRESHOLD] == 32 * 1024**2
    assert sorted(p for p, _ in restored) == sorted(_malloc._TUNED)
    assert all(v == _malloc._DEFAULT for _, v in restored)


def test_row_blocked_merges_run_in_any_thread(family, tmp_path, monkeypatch):
    """MLX streams belong to the thread that made them: each thread gets its own pair."""
    monkeypatch.setattr(row_blocks, "MIN_ENTRIES", 4096)
    monkeypatch.setattr(row_blocks, "BLOCK_ENTRIES", 2048)
    recipe = {"merge_method": "ties", "base_model": str(family["base"]), "dtype": "bfloat16",
              "models": [{"model": str(family[k]), "parameters": {"weight": 1.0, "density": 0.5}}
                         for k in ("model_a", "model_b")]}  # fmt: skip
    here = merge(recipe, tmp_path / "main")
    errors = []

    def worker():
        try:
            merge(recipe, tmp_path / "worker")
        except Exception as e:  # noqa: BLE001 (reported by the assertion below)
            errors.append(e)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert not errors
    for f in sorted(here.glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "worker" / f.name).read_bytes()
