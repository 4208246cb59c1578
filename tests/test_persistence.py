"""The persistence diagnostic reads what the store holds when nothing is edited, and an
edit moves the readings of the steps it edits."""

from __future__ import annotations

import numpy as np
import pytest

from actstore.intervene.persistence import main, persistence
from actstore.intervene.plan import plan_interventions
from actstore.intervene.run import _block_targets
from actstore.intervene.settings import InterventionSettings as IS
from actstore.intervene.targets import token_targets
from actstore.probe.runs import load_probe
from actstore.store.view import open_store
from conftest import IV_LAYERS, IV_STEPS, PixelLabels, store_catalog


def test_unedited_readings_equal_the_probes_on_stored_activations(ivstore, tiny_model):
    uri, run = ivstore["uri"], ivstore["runs"]["depth"]
    settings = IS(layers=tuple(IV_LAYERS), steps=(0,), strengths=(3.0,), n_targets=2,
                  images="12:16", provider=PixelLabels())
    res = persistence(uri, run, settings, model=tiny_model)
    assert res["strengths"] == [0.0, 3.0] and res["steps"] == IV_STEPS
    # oracle: the same probes applied to the activations materialize stored (float16)
    plan = plan_interventions(uri, run, settings)
    tgt, _ = _block_targets(plan, 0, len(plan.image_ids))
    view = open_store(uri)
    per_row = np.zeros((len(plan.image_ids) * 2, len(IV_STEPS)))
    for la in IV_LAYERS:
        p = load_probe(uri, run, la)
        act = np.asarray(view[la].isel(image=plan.positions).values, np.float64)
        n, _, h, w, c = act.shape
        tok = token_targets(tgt.reshape(-1, *plan.hw), (h, w), "continuous", "ridge")
        for j, s in enumerate(IV_STEPS):
            wv, b = np.asarray(p["weights"][p["steps"].index(s)]), float(p["bias"][p["steps"].index(s)])
            z = act[:, s].reshape(n, h * w, c) @ wv + b
            z = np.repeat(z, 2, axis=0)                      # rows: (image, target k)
            per_row[:, j] += np.sqrt(((z - tok) ** 2).mean(-1)) / len(IV_LAYERS)
    np.testing.assert_allclose(res["per_row"][0], per_row, rtol=1e-3, atol=1e-3)   # float16 storage
    # the edit acts at step 0 only: step 0's readings move, and it is the only one planned
    assert res["edited_steps"] == [0]
    assert not np.allclose(res["per_row"][1][:, 1], res["per_row"][0][:, 1])
    assert np.isfinite(res["final"]).all()


def _refused(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1, err
    return err[0]


def test_store_is_a_catalog_name_or_a_path(ivstore, tmp_path, capsys):
    """As every actstore command's --store: a catalog name reads its store (this one's
    label provider is the tests' own, so both stop at the same point past reading the probe
    run), and an unknown name is the same one line as an actstore command's, exit 2."""
    catalog = store_catalog(tmp_path, ivstore["uri"])
    argv = ["--probe-run", ivstore["runs"]["depth"], "--layers", IV_LAYERS[0], "--steps", "0"]
    by_path = _refused(capsys, ["--store", ivstore["uri"], *argv])
    assert "label provider pixel-test" in by_path
    assert _refused(capsys, ["--catalog", catalog, "--store", "iv", *argv]) == by_path
    assert _refused(capsys, ["--catalog", catalog, "--store", "ivv", *argv]) == (
        "python -m actstore.intervene.persistence: error: store ivv: does not exist; create "
        "it with `actstore materialize`")


def test_bad_step_is_one_line_and_nonzero(ivstore, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--store", ivstore["uri"], "--probe-run", ivstore["runs"]["depth"],
              "--layers", IV_LAYERS[0], "--steps", "99"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("python -m actstore.intervene.persistence: error: step 99")


def test_bad_numbers_are_one_line(ivstore, capsys):
    """Checked by their type, as the actstore commands check theirs (one line, exit 2)."""
    for argv, words in ((["--n-targets", "0"], "--n-targets: must be >= 1"),
                        (["--steps", "x"], "--steps: must be a whole number"),
                        (["--strength", "inf"], "--strength: must be a finite number")):
        with pytest.raises(SystemExit) as exc:
            main(["--store", ivstore["uri"], "--probe-run", ivstore["runs"]["depth"], *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and words in err[0], (argv, err)
