"""Label and probe settings travel whole (command line -> flow -> library), with every
default written once in the settings class: a settings object and the same choices as
keyword options make the same store, and bad values fail in one line."""

from __future__ import annotations

import shutil

import pytest

from actstore.errors import ActstoreError
from actstore.label.labels import write_labels
from actstore.label.settings import LabelSettings
from actstore.probe.runs import run_probes
from actstore.probe.settings import ProbeSettings
from flows.cli import build_parser
from storecheck import assert_same_store


def test_options_given_as_none_keep_the_default():
    assert LabelSettings().with_options(device=None, overwrite=None) == LabelSettings()
    assert LabelSettings().with_options(on_x0=False).on_x0 is False
    assert ProbeSettings().with_options(layers=None, steps=["2", 0]).steps == (0, 2)
    assert ProbeSettings(models="trained").models == ("trained",)
    with pytest.raises(TypeError, match="no option 'folds'"):
        ProbeSettings().with_options(folds=3)


@pytest.mark.parametrize("make, words", [
    (lambda: LabelSettings(batch_size=0), "--batch-size 0: must be at least 1"),
    (lambda: ProbeSettings(n_folds=1), "n_folds 1: cross-validation needs at least 2"),
])
def test_bad_settings_are_one_line(make, words):
    with pytest.raises(ActstoreError, match=words) as err:
        make()
    assert "\n" not in str(err.value)


def test_parser_leaves_defaults_to_the_settings():
    """An option left out reaches the settings as None, so the class's default applies."""
    args = build_parser().parse_args(["label", "--store", "s.zarr", "--provider", "toyworld",
                                      "--target", "depth"])
    assert args.device is None
    args = build_parser().parse_args(["probe", "--store", "s.zarr", "--target", "depth"])
    assert args.label_spearman is None and args.steps is None


def test_settings_object_equals_keyword_options(tmp_path, tiny_store):
    a, b = str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")
    shutil.copytree(tiny_store, a)
    shutil.copytree(tiny_store, b)
    write_labels(a, "toyworld", "depth", LabelSettings(on_x0=False, batch_size=3),
                 progress=False)
    out = write_labels(b, "toyworld", "depth", on_x0=False, batch_size=3, progress=False)
    assert out["x0"] is False
    layers = ["up_blocks.3.attentions.0"]
    run_probes(a, "depth", ProbeSettings(layers=layers, steps=(1, 3), n_folds=3),
               scheduler="sync", progress=False)
    run_probes(b, "depth", layers=layers, steps=[1, 3], n_folds=3, scheduler="sync",
               progress=False)
    assert_same_store(a, b)
