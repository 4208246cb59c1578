"""The installed package: one import for the public API, light to import, self-contained."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

API = {"open_store": "actstore.store.view", "materialize": "actstore.generation.materialize",
       "write_labels": "actstore.label.labels", "open_labels": "actstore.label.labels",
       "run_probes": "actstore.probe.runs", "load_probe": "actstore.probe.runs",
       "open_emergence": "actstore.probe.runs", "open_scores": "actstore.probe.runs",
       "run_interventions": "actstore.intervene.run",
       "InterventionSettings": "actstore.intervene.settings",
       "SweepSettings": "actstore.intervene.settings", "run_sweep": "actstore.intervene.sweep",
       "open_intervention": "actstore.intervene.results", "ActstoreError": "actstore.errors"}


def test_public_api_from_one_import():
    import actstore

    for name, module in API.items():
        assert getattr(actstore, name) is getattr(importlib.import_module(module), name), name
        assert name in actstore.__all__ and name in dir(actstore)
    with pytest.raises(AttributeError):
        actstore.no_such_name


READERS = ("actstore.probe.runs", "actstore.intervene.results", "actstore.label.labels",
           "actstore.probe.emergence", "actstore.store.view", "actstore.inventory")


@pytest.mark.parametrize("module", ["actstore", *READERS])
def test_import_actstore_is_light(module):
    """A notebook's first cell must not pay for torch, diffusers or Prefect; nor its
    readers' imports (README, notebook), nor `actstore show`'s: the probe runs' module
    imported the fitting grid, whose metrics imported torch at the top, and the inventory
    the sweep runner with the models, 3-5 s of every `show` and of `latest_run`'s import."""
    code = (f"import sys, {module}; heavy = [m for m in ('torch', 'diffusers', 'prefect', "
            "'transformers', 'distributed') if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    assert out.stdout.strip() == "", f"import actstore imported {out.stdout.strip()}"


def test_schema_is_one_file_linked_from_schemas():
    from actstore.catalog import SCHEMA_PATH

    assert SCHEMA_PATH.parent == REPO / "actstore"
    assert (REPO / "schemas" / "catalog.schema.json").resolve() == SCHEMA_PATH.resolve()


def test_built_wheel_carries_schema_and_validates_outside_checkout(tmp_path):
    """Build a wheel from a copy of the sources, import it from elsewhere, load a catalog."""
    src = tmp_path / "src"
    for part in ("actstore", "flows"):
        shutil.copytree(REPO / part, src / part,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", src)
    shutil.copy(REPO / "README.md", src)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheels), str(src)], check=True, capture_output=True,
                   timeout=300)
    (wheel,) = wheels.glob("actstore-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        shipped = zf.read("actstore/catalog.schema.json")
        zf.extractall(tmp_path / "site")
    assert json.loads(shipped) == json.loads((REPO / "schemas/catalog.schema.json").read_text())

    bad = tmp_path / "elsewhere" / "catalog.yaml"
    bad.parent.mkdir()
    bad.write_text("version: 1\nmodels:\n  m:\n    pth: x\n")
    code = ("import actstore, actstore.catalog as c\n"
            "print(actstore.__file__)\n"
            "try:\n    c.load_catalog('catalog.yaml')\n"
            "except actstore.ActstoreError as e:\n    print(e)\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=bad.parent, env=env, check=True).stdout.splitlines()
    assert out[0].startswith(str(tmp_path / "site")), out  # the wheel, not the checkout
    assert "models.m: unknown key 'pth'" in out[1]
