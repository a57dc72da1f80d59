"""Print docs/architectures.md's table from the architecture matrix's test results.

    PYTHONPATH=$PWD python3 tests/arch_table.py [pytest args] > /tmp/table.md

Runs the matrix tests (by default every ``tests/test_arch_matrix*.py``), groups each test's
outcome by architecture (the test parameter whose value is a key of ``archs.ARCHS``) and by verb
column (``COLUMNS``: test-name prefix → column), and prints a Markdown table: ``yes`` when all of a
cell's tests pass, ``yes except (1)`` with a numbered note when some are expected failures (the
xfail's reason), ``refused (1)`` when skipped with a reason, ``FAILS`` when any test fails, ``—``
when no test covers the cell.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from archs import ARCHS

# Column → test-name prefixes that feed it. Forward-pass verbs (sae collect, abliterate, eval)
# are filled by their matrix tests when those exist; until then their cells read "—".
COLUMNS: dict[str, tuple[str, ...]] = {
    "inspect": ("test_inspect",),
    "convert MLX↔HF": (
        "test_convert_round_trip",
        "test_layout_loads_in_mlx_lm",
        "test_hf_layout_has_no_stacked",
    ),
    "merge (linear, slerp, ties)": ("test_linear_merge", "test_slerp", "test_ties"),
    "frankenmerge": ("test_frankenmerge",),
    "transformers load + logits": (
        "test_hf_layout_loads_in_transformers",
        "test_converted_and_merged_hf_outputs",
        "test_checkpoint_saved_by_transformers",
    ),
    "sae collect": ("test_sae_collect",),
    "abliterate": ("test_abliterate",),
    "eval": ("test_eval",),
}


class Collect:
    def __init__(self):
        self.cells: dict[tuple[str, str], list[tuple[str, str]]] = {}

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        rep = outcome.get_result()
        params = getattr(getattr(item, "callspec", None), "params", {})
        arch = next((v for v in params.values() if isinstance(v, str) and v in ARCHS), None)
        column = next((c for c, ps in COLUMNS.items() if item.originalname.startswith(ps)), None)
        if arch is None or column is None:
            return
        if rep.when == "call" or (rep.when == "setup" and not rep.passed):
            if hasattr(rep, "wasxfail"):
                state = ("xfail", rep.wasxfail)
            elif rep.skipped:
                state = ("skip", str(rep.longrepr[-1]) if isinstance(rep.longrepr, tuple) else "")
            else:
                state = (rep.outcome, "")
            self.cells.setdefault((arch, column), []).append(state)


def table(cells: dict) -> str:
    notes: list[str] = []

    def note(reason: str) -> str:
        reason = reason.removeprefix("reason: ").strip()
        if reason not in notes:
            notes.append(reason)
        return str(notes.index(reason) + 1)

    lines = [
        "| model_type | " + " | ".join(COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    for arch, cfg in ARCHS.items():
        label = cfg["model_type"] + ("" if arch == cfg["model_type"] else f" ({arch})")
        row = []
        for column in COLUMNS:
            states = cells.get((arch, column))
            if not states:
                row.append("—")
            elif any(s == "failed" for s, _ in states):
                row.append("FAILS")
            elif any(s == "xfail" for s, _ in states):
                refs = dict.fromkeys(note(r) for s, r in states if s == "xfail")
                row.append(f"yes except ({', '.join(refs)})")
            elif all(s == "skip" for s, _ in states):
                row.append(f"refused ({note(states[0][1])})")
            else:
                row.append("yes")
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    lines.append("")
    lines += [f"{i + 1}. {n}" for i, n in enumerate(notes)]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = argv or sorted(str(p) for p in HERE.glob("test_arch_matrix*.py"))
    collect = Collect()
    code = pytest.main(["-q", "-p", "no:cacheprovider", *args], plugins=[collect])
    counts: dict[str, int] = {}
    for states in collect.cells.values():
        for s, _ in states:
            counts[s] = counts.get(s, 0) + 1
    print(table(collect.cells))
    print("\nmatrix outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return int(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
