"""scripts/install.sh's flags, checked without installing anything: an unknown flag is refused with
the usage line, and MTBERT_INSTALL_DRY_RUN=1 prints the commands instead of running them."""
import os
import re
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "install.sh"


def install(*flags: str, dry_run: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "MTBERT_SKIP_BROWSER_TESTS": "1"}  # never reach for apt-get
    env.pop("MTBERT_INSTALL_DRY_RUN", None)
    if dry_run:
        env["MTBERT_INSTALL_DRY_RUN"] = "1"
    return subprocess.run(["bash", str(SCRIPT), *flags], env=env, capture_output=True, text=True, timeout=60)


def commands(*flags: str) -> list[str]:
    done = install(*flags)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines and all(line.startswith("+ ") for line in lines), done.stdout  # nothing ran
    return lines


def torch_pins(lines: list[str]) -> list[str]:
    return [pin for line in lines for pin in re.findall(r"\btorch=+\S+", line)]


def test_unknown_flag_prints_usage_with_cuda_and_exits_2():
    done = install("--no-such-flag", dry_run=False)  # refused before anything runs
    assert done.returncode == 2
    assert "usage: scripts/install.sh" in done.stderr and "--cuda" in done.stderr
    assert done.stdout == ""


def test_help_lists_every_flag():
    done = install("--help", dry_run=False)
    assert done.returncode == 0
    assert all(flag in done.stdout for flag in ("--test", "--base", "--cuda"))


def test_cuda_changes_only_the_torch_command_and_pins_the_same_version():
    cpu, cuda = commands(), commands("--cuda")
    assert len(cpu) == len(cuda)
    changed = [(a, b) for a, b in zip(cpu, cuda) if a != b]
    assert len(changed) == 1
    [cpu_pin], [cuda_pin] = torch_pins(cpu), torch_pins(cuda)
    version = cpu_pin.split("==")[-1]
    assert re.fullmatch(r"\d+\.\d+\.\d+", version)
    assert cpu_pin == f"torch=={version}"  # matches a local +cpu build where pip is offered one
    assert cuda_pin == f"torch==={version}"  # exactly that version: PyPI's own (CUDA on Linux) wheel
    [(cpu_line, cuda_line)] = changed
    assert cuda_line.replace(cuda_pin, cpu_pin) == cpu_line  # the same pip command, only the pin differs


@pytest.mark.parametrize("extra", [["--test"], ["--base"], ["--test", "--base"]])
def test_cuda_combines_with_test_and_base(extra):
    plain, cuda = commands(*extra), commands("--cuda", *extra)
    assert [line for line in plain if "torch==" not in line] == [line for line in cuda if "torch==" not in line]
    assert torch_pins(cuda) == ["torch===" + torch_pins(plain)[0].split("==")[-1]]
    assert any("[test]" in line for line in cuda) == ("--test" in extra)
    assert any("install-backbone mpnet-base" in line for line in cuda) == ("--base" in extra)
