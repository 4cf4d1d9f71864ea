"""The wheel holds every package of the source tree (setuptools' list is explicit, so a new folder must be added)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _source_packages() -> set[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for package, folder in config["package-dir"].items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            relative = init.parent.relative_to(base)
            if any(part in config["package-dir"].values() for part in relative.parts[:1]) and package == "fedge":
                continue  # a role folder seen through the fedge/<role> link is packaged under its own mapping
            found.add(".".join([package, *relative.parts]))
    return found


def test_every_source_package_is_packaged() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(config["packages"]) == _source_packages()
