"""`pip install .` installs the package corespond and the console script, nothing else."""

import configparser
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_holds_only_the_corespond_package(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--quiet", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True,
    )  # fmt: skip
    [wheel] = tmp_path.glob("corespond-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names}
    assert top == {"corespond", next(t for t in top if t.endswith(".dist-info"))}
    for package in ("daemon", "adapters", "rules"):
        assert f"corespond/{package}/__init__.py" in names
    assert "corespond/daemon/store/migrations/env.py" in names
    assert any(n.startswith("corespond/daemon/store/migrations/versions/") for n in names)
    assert not any(n.startswith(("corespond/tests", "corespond/bench")) for n in names)
    dist_info = next(t for t in top if t.endswith(".dist-info"))
    entry_points = zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
    assert "corespond = corespond.daemon.cli:main" in entry_points


def test_metadata_lives_in_setup_cfg() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert "[project]" not in pyproject
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["metadata"]["name"] == "corespond"
