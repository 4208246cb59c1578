"""A hypothesis state machine over one store, against a serial reference.

Steps in random order: materialize a region (any block-aligned one, again or anew), label
one or two targets (overwriting), fit a probe run, each possibly stopped at a random write
(the faulty filesystem: nothing after that write reaches storage, as after kill -9). After
every step, what a reader sees must be a consistent prefix of the reference: only whole
blocks, identical to the serial run; targets whole and identical, multi-target sets
all-or-nothing; probe runs complete and identical; no unreachable leftovers after a
successful run of the same kind.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule, run_state_machine_as_test)

import faults
from actstore.errors import ActstoreError
from actstore.generation.materialize import MaterializeSettings, materialize
from actstore.generation.sampling import GenerationConfig
from actstore.label.labels import list_targets, open_labels, write_labels
from actstore.probe.runs import latest_run, list_runs, load_probe, run_probes
from actstore.store import labelsets
from actstore.store.core import blocks_of, completed_blocks
from actstore.store.view import open_store
from conftest import DEMO
from test_labels import Brightness

# a store resumed after a kill reads without notes from zarr (its bookkeeping folders
# are not zarr nodes): any UserWarning fails these tests
pytestmark = pytest.mark.filterwarnings("error::UserWarning")

N, BLOCK, STEPS = 16, 4, 2
ALL = set(blocks_of(N, BLOCK))
REGIONS = ["0:4", "4:8", "8:12", "12:16", "0:8", "8:16", "0:16", "0:16"]
TARGETS = ["depth", "salient", "shade"]
LAYER = "up_blocks.3.attentions.0"
CRASH = st.one_of(st.none(), st.integers(1, 90))
ENV: dict = {}


def _materialize(uri: str, region: str | None) -> None:
    materialize(ENV["model"], DEMO, uri,
                MaterializeSettings(gen=GenerationConfig(steps=STEPS), batch_size=4,
                                    block_size=BLOCK),
                images=region, progress=False)


def _label(uri: str, targets: list[str]) -> None:
    write_labels(uri, Brightness(), targets, overwrite=True, on_x0=False, progress=False)


def _probe(uri: str, target: str) -> str:
    return run_probes(uri, target, layers=[LAYER], steps=[0, 1], scheduler="threads",
                      progress=False)


def _blocks(region: str) -> set:
    a, b = map(int, region.split(":"))
    return set(blocks_of(N, BLOCK, a, b))


class StoreMachine(RuleBasedStateMachine):
    @initialize()
    def fresh_store(self):
        self.tmp = tempfile.mkdtemp()
        self.path = f"{self.tmp}/s.zarr"
        self.uri = faults.url(self.path)
        self.done: set = set()        # blocks known complete
        self.tried: set = set()       # blocks some run started
        self.labelled: set = set()    # targets known committed
        self.maybe: set = set()       # targets of crashed label runs

    def teardown(self):
        faults.FaultyFileSystem.reset()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _attempt(self, crash, call) -> bool:
        """Run ``call`` with writes stopped at write ``crash``; True if it completed."""
        faults.FaultyFileSystem.reset(None if crash is None else faults.Plan("crash", crash))
        try:
            call()
            ok = True
        except (faults.Crash, ActstoreError) as exc:
            assert isinstance(exc, faults.Crash) or faults.FaultyFileSystem.stopped, exc
            ok = False
        finally:
            stopped = faults.FaultyFileSystem.stopped
            faults.FaultyFileSystem.reset()
        return ok and not stopped

    @rule(region=st.sampled_from(REGIONS), crash=CRASH)
    def materialize_region(self, region, crash):
        self.tried |= _blocks(region)
        if self._attempt(crash, lambda: _materialize(self.uri, region)):
            self.done |= _blocks(region)

    @precondition(lambda self: self.done == ALL)
    @rule(names=st.lists(st.sampled_from(TARGETS), min_size=1, max_size=2, unique=True),
          crash=CRASH)
    def label(self, names, crash):
        targets = names
        before = {t: a.get("commit") for t, a in labelsets.current(self.path).items()}
        ok = self._attempt(crash, lambda: _label(self.uri, targets))
        after = {t: a.get("commit") for t, a in labelsets.current(self.path).items()}
        changed = {t for t in targets if after.get(t) != before.get(t)}
        assert changed in (set(), set(targets)), f"set {targets} half visible: {changed}"
        assert len({after[t] for t in changed}) <= 1        # one commit for the whole set
        if ok:
            assert changed == set(targets)
            self.labelled |= set(targets)
            for t in targets:   # nothing of this target's dead writers is left behind
                assert not list((Path(self.path) / "labels" / t).rglob("_pending"))
        else:
            self.maybe |= set(targets)

    @precondition(lambda self: self.done == ALL and self.labelled)
    @rule(data=st.data(), crash=CRASH)
    def probe(self, data, crash):
        target = data.draw(st.sampled_from(sorted(self.labelled)))
        before = set(list_runs(self.path))
        ok = self._attempt(crash, lambda: _probe(self.uri, target))
        new = set(list_runs(self.path)) - before
        assert len(new) == (1 if ok else len(new)) and len(new) <= 1
        if ok:
            assert not list((Path(self.path) / "probes").rglob("_pending"))
            assert {p.name for p in (Path(self.path) / "probes").iterdir()} == \
                set(list_runs(self.path)) | {"zarr.json"}   # no dead runs left

    @invariant()
    def readers_see_a_prefix_of_the_reference(self):
        if not hasattr(self, "path"):
            return
        try:
            view = open_store(self.path)
        except ActstoreError as exc:
            assert not self.done, exc
            assert "\n" not in str(exc)
            return
        recorded = completed_blocks(self.path, "trained")
        assert self.done <= recorded <= self.tried
        ref = ENV["ref"]
        np.testing.assert_array_equal(
            view[LAYER].values, open_store(ref)[LAYER].isel(image=view.image_index).values)
        visible = set(list_targets(self.path))
        assert self.labelled <= visible <= self.labelled | self.maybe
        for t in visible:
            np.testing.assert_array_equal(open_labels(self.path, t)["r8"].values,
                                          open_labels(ref, t)["r8"].values)
        for run, attrs in list_runs(self.path).items():
            want = load_probe(ref, latest_run(ref, attrs["target"]), LAYER)["weights"]
            np.testing.assert_allclose(load_probe(self.path, run, LAYER)["weights"], want,
                                       rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model) -> str:
    """The serial reference: every block, every target, one probe run per target."""
    uri = str(tmp_path_factory.mktemp("machine") / "ref.zarr")
    ENV["model"] = tiny_model
    _materialize(uri, None)
    for t in TARGETS:
        _label(uri, [t])
        _probe(uri, t)
    return uri


def test_store_state_machine(reference, tiny_model):
    faults.register()
    ENV.update(model=tiny_model, ref=reference)
    run_state_machine_as_test(StoreMachine, settings=settings(
        max_examples=3, stateful_step_count=8, deadline=None,
        suppress_health_check=list(HealthCheck)))
