"""The benchmark scripts still run against the library they measure: their dry runs trace every measured
function (shapes only) on the CPU. A script that falls behind a library signature fails here, not on the
device it was meant for."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dual_branch_dry_run_traces_the_three_settings(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import dual_branch
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert dual_branch.main(["--model", "sd15", "--scale", "tiny", "--dry_run"]) is None
    out = capsys.readouterr().out
    for label in ("plain T2I (CFG)", "RealCustom++, no early stop", "RealCustom++, T_stop=5"):
        assert f"{label}: traced" in out, out
