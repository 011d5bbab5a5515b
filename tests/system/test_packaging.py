"""The wheel installs one import package, ``mlgate``, and an ``mlgate`` console script.

Built from this checkout into a fresh virtual environment (its dependencies borrowed
from the project's environment through a ``.pth`` line, so no download is needed),
then run from another directory, where nothing of the checkout is importable.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import tomllib
import venv
from pathlib import Path

import pytest

from tests.service_process import REPO


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed; returns its bin directory."""
    root = tmp_path_factory.mktemp("packaging")
    wheels = root / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(wheels), str(REPO)],
        check=True, cwd=root, timeout=300,
    )
    (wheel,) = wheels.glob("mlgate-*.whl")
    env_dir = root / "fresh"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-index", "-q", str(wheel)],
        check=True, cwd=root, timeout=300,
    )
    fresh_site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
    )
    dependencies = sysconfig.get_paths()["purelib"]
    (fresh_site / "project_dependencies.pth").write_text(dependencies + "\n")
    return env_dir / "bin"


def fresh_site_packages(bin_dir: Path) -> Path:
    out = subprocess.run(
        [str(bin_dir / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    )
    return Path(out.stdout.strip())


def test_the_console_script_runs_from_another_directory(installed: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [str(installed / "mlgate"), "--help"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "usage: mlgate" in result.stdout
    for command in ("serve", "keys", "log", "quality", "check-config"):
        assert command in result.stdout


def test_the_wheel_installs_only_the_mlgate_import_package(installed: Path) -> None:
    top_level = {
        path.name
        for path in fresh_site_packages(installed).iterdir()
        if not path.name.endswith((".dist-info", ".pth")) and path.name != "__pycache__"
    }
    assert top_level == {"mlgate"}


def test_the_installed_package_is_the_wheel_not_the_checkout(installed: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [str(installed / "python"), "-c", "import mlgate.service.app as m; print(m.__file__)"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert str(fresh_site_packages(installed)) in result.stdout


def test_pyproject_lists_every_package_of_the_tree() -> None:
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    in_tree = {"mlgate"} | {
        "mlgate." + ".".join(init.parent.relative_to(REPO).parts)
        for folder in ("config", "schemas", "service", "workers")
        for init in (REPO / folder).rglob("__init__.py")
    }
    assert listed == in_tree

