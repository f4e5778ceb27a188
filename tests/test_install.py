"""What the install promises: the Python it claims is the one the code needs, and only CPU torch."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_claimed_python_is_the_one_the_code_and_its_checks_target():
    # tomllib and datetime.UTC are 3.11+: claiming 3.10 would install and then fail on import
    assert PROJECT["project"]["requires-python"] == ">=3.11"
    assert PROJECT["tool"]["ruff"]["target-version"] == "py311"
    assert PROJECT["tool"]["mypy"]["python_version"] == "3.11"
    assert re.search(r"Python 3\.11\+", (ROOT / "README.md").read_text())


def test_the_default_install_asks_for_the_cpu_build_and_never_a_bare_torch():
    """A bare `torch==X` from PyPI is the CUDA build on Linux x86_64; only TORCH=cuda may ask for it."""
    makefile = (ROOT / "Makefile").read_text()
    cpu = makefile[makefile.index("cpu)") : makefile.index("cuda)")]
    assert cpu.count('"torch==2.13.0+cpu"') == 2 and "torch==2.13.0 " not in cpu
    pins = (ROOT / ".ci" / "constraints.txt").read_text().splitlines()
    assert "torch==2.13.0" in pins and "torchvision==0.28.0" in pins


def test_the_pi_lock_holds_no_cuda_package():
    lock = (ROOT / "deploy" / "pi" / "requirements-aarch64.txt").read_text().lower()
    pins = re.findall(r"^([a-z0-9._-]+)==", lock, re.MULTILINE)
    assert "torch" in pins and not [p for p in pins if p.startswith("nvidia")]
