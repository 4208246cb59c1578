"""Every command line and Python snippet of the README, run as written, in both modes.

The commands run from a folder laid out as a user's would be: its own ``catalog.yaml``
(the store ``toy`` is tiny-random on 12 toyworld prompts at 5 steps, so a run takes
seconds), ``prompts/``, ``my.parquet``, ``my_labels.npz``, and ``$HOME`` holding small
models at the README's paths (``~/sd-v1-4``, ``~/models/dpt-large``, ``~/models/segformer``).
README placeholders are filled in: ``S`` is that catalog store, ``...`` a layer or step
list, a probe run id the store's latest. Where a line cannot run on this machine as written
(a GPU and an S3 bucket), :data:`CASES` says what is changed and why. A README command
without a case here fails :func:`test_every_readme_command_has_a_case`.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from actstore.store.view import open_store
from conftest import REPO
from flows.cli import main

README = REPO / "README.md"
N_TRAIN, N_TEST, STEPS = 8, 4, 5
CATALOG = f"""version: 1
models:
  tiny: {{builtin: tiny-random}}
prompt_sets:
  demo: {{path: prompts/demo.csv}}
  toyworld-small: {{path: prompts/toyworld-small.csv}}
stores:
  toy: {{uri: runs/toy.zarr, model: tiny, prompts: toyworld-small, steps: {STEPS}}}
"""


def readme_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def readme_commands() -> list[str]:
    """``actstore`` lines of the README's bash blocks, continuations joined, comments cut."""
    out = []
    for block in readme_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = " ".join(re.sub(r"\s#.*$", "", line).split())
            if line.startswith("actstore "):
                out.append(line)
    return out


# README line -> (store state it needs, the command lines run for it)
CASES = {
    "actstore materialize --model tiny-random --prompts prompts/demo.csv --store runs/demo.zarr":
        ("none", ["{line}"]),
    "actstore materialize --store toy": ("none", ["{line}"]),
    "actstore materialize --store toy --control randomized": ("trained", ["{line}"]),
    "actstore materialize --store toy --workers 2": ("none", ["{line}"]),
    "actstore materialize --store toy --capture attn1,resnet": ("trained", ["{line}"]),
    "actstore verify --store toy --images 0:8": ("trained", ["{line}"]),
    "actstore show --store S": ("probed", ["{line}"]),
    # a GPU cluster and an S3 bucket: the test's CPU scheduler, a local store, 2 steps
    "actstore materialize --store s3://bkt/p.zarr --model ~/sd-v1-4 --prompts p.csv "
    "--cluster tcp://HEAD:8786":
        ("none", ["actstore materialize --store runs/s.zarr --model ~/sd-v1-4 --prompts p.csv "
                  "--cluster {scheduler} --steps 2"]),
    "actstore label --store S --provider toyworld --target depth salient shading":
        ("materialized", ["{line}"]),
    "actstore label --store S --provider hf-depth:~/models/dpt-large --target depth":
        ("materialized", ["{line}"]),
    "actstore label --store S --provider array:my_labels.npz --target mask":
        ("materialized", ["{line}"]),
    # as written, then with the options its comment names and a real --scheduler
    "actstore probe --store S --target depth --figures runs/figs":
        ("labelled", ["{line}", "{line} --layers up_blocks.3.attentions.0 "
                      "mid_block.attentions.0 --steps 0 4 --models trained randomized "
                      "--scheduler {scheduler}"]),
    # and the gradient method at one strength, 2 Adam iterations instead of 128 (short)
    "actstore intervene --store S --probe-run salient-20261127T070000123456-a1b2c3 "
    "--strength 1 3 10":
        ("probed", ["{line}", "actstore intervene --store S --probe-run "
                    "salient-20261127T070000123456-a1b2c3 --method gradient --strength 1 "
                    "--iterations 2"]),   # the line's --strength replaced, not given twice
    "actstore intervene --store S --probe-run depth-... --targets insert --images toy-0001 "
    "toy-0004": ("probed", ["{line}"]),
    # the store has 4 test images (as written a sweep takes 4 + 8) and a one-cell grid
    "actstore sweep --store S --probe-run salient-... depth-... --out runs/sweep":
        ("probed", ["{line} --validation 2 --evaluation 2 --kinds attn1 --step-counts 1 "
                    "--strength 1 --n-targets 2"]),
    # the whole job at 2 steps and one target (as written: 15 steps, three targets, minutes)
    "actstore main --model tiny-random --out runs/tiny":
        ("none", ["{line} --steps 2 --targets salient"]),
}


def test_every_readme_command_has_a_case():
    commands = readme_commands()
    missing = [c for c in commands if c not in CASES]
    assert not missing, f"README commands without a case in tests/test_readme.py: {missing}"
    stale = [c for c in CASES if c not in commands]
    assert not stale, f"cases for commands the README no longer has: {stale}"


def _fill(template: str, line: str, user: Path, scheduler: str | None) -> list[str]:
    from actstore.probe.runs import latest_run

    text = template.replace("{line}", line).replace("{scheduler}", scheduler or "")
    argv = shlex.split(text)[1:]
    store = str(user / "runs" / "toy.zarr")
    for i, arg in enumerate(argv):
        if arg == "S":
            argv[i] = "toy"
        elif re.fullmatch(r"(salient|depth)-(\.\.\.|\d{8}T\d{12}-[0-9a-f]{6})", arg):  # a run id
            argv[i] = latest_run(store, arg.split("-")[0])
    return argv


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_model):
    """Everything a user's folder holds, built once; each test gets a copy of the store in
    the state it needs ('none', 'trained', 'materialized', 'labelled', 'probed',
    'intervened')."""
    from actstore.generation.materialize import MaterializeSettings, materialize
    from actstore.generation.models import (apply_control, load_model, save_pipeline_folder,
                                            tiny_random_components)
    from actstore.generation.sampling import GenerationConfig
    from actstore.label.labels import write_labels
    from actstore.intervene.run import run_interventions
    from actstore.intervene.settings import InterventionSettings
    from actstore.probe.runs import latest_run, run_probes
    from test_labels import _tiny_dpt, _tiny_segformer

    root = tmp_path_factory.mktemp("readme")
    (root / "prompts").mkdir()
    shutil.copy(REPO / "prompts" / "demo.csv", root / "prompts")
    toy = pd.read_csv(REPO / "prompts" / "toyworld.csv")
    small = pd.concat([toy[toy.split == "train"][:N_TRAIN], toy[toy.split == "test"][:N_TEST]])
    assert {"toy-0001", "toy-0004"} <= set(small.image_id)
    small.to_csv(root / "prompts" / "toyworld-small.csv", index=False)
    small.to_csv(root / "p.csv", index=False)
    demo = pd.read_csv(REPO / "prompts" / "demo.csv")
    pd.concat([demo.assign(image_id=demo.image_id + f"-{k}", seed=demo.seed + 1000 * k)
               for k in range(4)]).to_parquet(root / "my.parquet", index=False)
    home = root / "home"
    save_pipeline_folder(home / "sd-v1-4", tiny_random_components())
    _tiny_dpt(home / "models" / "dpt-large")
    _tiny_segformer(home / "models" / "segformer")

    states = root / "states"
    table = str(root / "prompts" / "toyworld-small.csv")
    settings = MaterializeSettings(gen=GenerationConfig(steps=STEPS))
    materialize(tiny_model, table, str(states / "trained.zarr"), settings, progress=False)
    shutil.copytree(states / "trained.zarr", states / "materialized.zarr")
    materialize(apply_control(load_model("tiny-random", device="cpu"), "randomized"), table,
                str(states / "materialized.zarr"), settings, progress=False)
    shutil.copytree(states / "materialized.zarr", states / "labelled.zarr")
    write_labels(str(states / "labelled.zarr"), "toyworld", ["depth", "salient", "shading"],
                 progress=False)
    shutil.copytree(states / "labelled.zarr", states / "probed.zarr")
    for target in ("salient", "depth"):
        run_probes(str(states / "probed.zarr"), target, scheduler="sync", progress=False)
    shutil.copytree(states / "probed.zarr", states / "intervened.zarr")
    run_interventions(str(states / "intervened.zarr"),
                      latest_run(str(states / "intervened.zarr"), "salient"),
                      InterventionSettings(images=("toy-0001",), n_targets=1), progress=False)
    ids = list(small.image_id)
    rng = np.random.default_rng(0)
    np.savez(root / "my_labels.npz", image_id=np.array(ids),
             mask=(rng.random((len(ids), 64, 64)) > 0.5).astype(np.float32))
    return root


@pytest.fixture()
def user(tmp_path, base, monkeypatch):
    """A user's folder (the cwd, with $HOME set to the models' folder)."""
    folder = tmp_path / "user"
    folder.mkdir()
    (folder / "catalog.yaml").write_text(CATALOG)  # its folder anchors relative paths
    for name in ("prompts", "my.parquet", "my_labels.npz", "p.csv"):
        (folder / name).symlink_to(base / name)
    monkeypatch.chdir(folder)
    monkeypatch.setenv("HOME", str(base / "home"))
    return folder


def _place(base: Path, user: Path, state: str) -> None:
    """Put the catalog store ``toy`` in the user's folder, in the state a case needs."""
    if state != "none":
        shutil.copytree(base / "states" / f"{state}.zarr", user / "runs" / "toy.zarr")


@pytest.fixture(scope="module")
def scheduler():
    """A real Dask scheduler on a TCP port, for the README's --scheduler form."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, protocol="tcp",
                      dashboard_address=None) as cluster:
        yield cluster.scheduler_address


@pytest.mark.parametrize("mode", ["prefect", "no-prefect"])
@pytest.mark.parametrize("line", list(CASES), ids=lambda line: line[9:70])
def test_readme_command(line, mode, base, user, request, capfd):
    state, templates = CASES[line]
    _place(base, user, state)
    if mode == "prefect":
        request.getfixturevalue("prefect_harness")
    sched = request.getfixturevalue("scheduler") if "{scheduler}" in str(templates) else None
    for template in templates:
        argv = _fill(template, line, user, sched)
        if mode == "no-prefect" and (argv[0] == "main" or {"--workers", "--cluster"} & {*argv}):
            assert main(["--no-prefect", *argv]) == 2    # Prefect flows (on Dask) only
            return
        flags = ["--no-prefect"] if mode == "no-prefect" else []
        assert main([*flags, *argv]) == 0, argv
    captured = capfd.readouterr()
    _check(line, user, captured.out)
    if line.startswith("actstore main"):    # one bar per stage, no INFO logs
        err = captured.err
        for stage in ("materialize trained", "materialize randomized", "label salient",
                      "probe salient", "intervene salient projection"):
            assert f"{stage}: 100%" in err, stage
        assert "INFO" not in err


def _check(line: str, user: Path, out: str) -> None:
    """What the command must have left behind, read back through the library."""
    from actstore.intervene.results import list_interventions
    from actstore.label.labels import list_targets
    from actstore.probe.runs import list_runs

    toy = str(user / "runs" / "toy.zarr")
    words = shlex.split(line)
    if words[1] == "materialize":
        store = {"runs/demo.zarr": "runs/demo.zarr", "toy": toy}.get(
            words[words.index("--store") + 1], "runs/s.zarr")
        variant = "randomized" if "--control" in words else "trained"
        view = open_store(store, model=variant)
        assert len(view.image_index) == len(view.images["image"]) > 0
        if "--capture" in words:
            assert any(name.startswith("resnet/") for name in view.layers), view.layers
    elif words[1] == "verify":
        assert "8/8 images of trained reproduced (bitwise)" in out, out
    elif words[1] == "show":
        assert list_runs(toy) and all(run in out for run in list_runs(toy)), out
        assert all(f"  {t} " in out for t in list_targets(toy)), out
    elif words[1] == "label":
        for target in words[words.index("--target") + 1:]:
            assert target in list_targets(toy), target
    elif words[1] == "main":
        assert (user / "runs/tiny/summary.txt").read_text().startswith("target")
        assert (user / "runs/tiny/report.html").stat().st_size > 0
    elif words[1] == "probe":
        runs = [r for r in list_runs(toy).values() if r["target"] == "depth"]
        assert [(r["layers"], r["steps"], set(r["models"])) for r in runs[-2:]] == [
            (open_store(toy).layers, list(range(STEPS)), {"trained", "randomized"}),
            (["up_blocks.3.attentions.0", "mid_block.attentions.0"], [0, 4],
             {"trained", "randomized"})]
        assert Path("runs/figs/depth-curves.png").stat().st_size > 0
    elif words[1] == "sweep":
        from actstore.intervene.sweep import list_sweeps

        records = {r["target"]: r for r in list_sweeps(toy).values()}
        assert set(records) == {"salient", "depth"}
        for r in records.values():
            assert not set(r["validation_images"]) & set(r["evaluation_images"])
            assert r["result"] is None or r["result"]["interventions"] == 2 * 2
        assert "causal test" in out and Path("runs/sweep/dose-response.png").stat().st_size
    else:
        done = list_interventions(toy)
        assert done and all(s["interventions"] > 0 for s in done.values())


def test_readme_python_snippets(base, user):
    """The README's Python blocks, line by line, against a store at the paths they name."""
    _place(base, user, "intervened")
    shutil.copytree(user / "runs" / "toy.zarr", user / "runs" / "main" / "store.zarr")
    namespace = {"u": "runs/main/store.zarr"}
    blocks = readme_blocks("python")
    assert blocks
    for block in blocks:
        for line in block.splitlines():
            code = re.sub(r"\s#.*$", "", line).strip()
            if not code:
                continue
            try:
                value = eval(code, namespace)
            except SyntaxError:
                exec(code, namespace)
                continue
            assert value is not None, code
            if hasattr(value, "compute"):
                value = value.compute()
            assert np.size(getattr(value, "values", value)) > 0, code
