"""scripts/gpu-check, as CI can run it without a GPU: its dry run lists every part with its time
budget (the whole within 7 minutes) and the wheels it expects, and every `studio bench` command
it would run is one the CLI takes."""

import importlib.machinery
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from studio.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent


def gpu_check():
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(ROOT / "scripts" / "gpu-check"))
    spec = importlib.util.spec_from_loader("gpu_check", loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up there
    loader.exec_module(module)
    return module


def test_the_dry_run_lists_the_parts_their_budgets_and_the_wheels():
    done = subprocess.run([sys.executable, "scripts/gpu-check", "--dry-run"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    module = gpu_check()
    assert sum(part.budget_s for part in module.PARTS) <= module.WALL_BUDGET_S <= 420
    for part in module.PARTS:
        assert part.name in done.stdout and f"{part.budget_s} s" in done.stdout
    for wheel in (*module.EXPECTED_WHEELS, *module.OPTIONAL_WHEELS):
        assert f"wheel {wheel}" in done.stdout


@pytest.mark.parametrize("part", [p for p in gpu_check().PARTS if "studio.cli" in p.command],
                         ids=lambda p: p.name)
def test_every_bench_part_is_a_command_the_cli_takes(part):
    argv = part.command[part.command.index("studio.cli") + 1:]
    build_parser().parse_args([arg.replace("{out}", "/tmp/out") for arg in argv])
