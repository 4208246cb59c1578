"""The report page: parses, embeds every figure the job drew (byte for byte), tables agree
with the store, and a job that ran only partly still gets a page."""

from __future__ import annotations

import base64
from html.parser import HTMLParser
from pathlib import Path

import pytest

from actstore.plots.report import SECTIONS, Section, write_report

VOID = {"meta", "img", "br", "hr", "link", "input"}


class Page(HTMLParser):
    """Collects headings, images and table cells, and checks every tag is closed in order."""

    def __init__(self, text: str):
        super().__init__()
        self.stack, self.h2, self.imgs, self.cells, self.text = [], [], [], [], []
        self._in = None
        self.feed(text)
        self.close()
        assert not self.stack, f"unclosed tags: {self.stack}"

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs))
        if tag not in VOID:
            self.stack.append(tag)
        self._in = tag

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()
        self._in = None

    def handle_data(self, data):
        self.text.append(data)
        if self._in == "h2":
            self.h2.append(data)
        elif self._in in ("td", "th"):
            self.cells.append(data)


def _png(src: str) -> bytes:
    head, data = src.split(",", 1)
    assert head == "data:image/png;base64"
    raw = base64.b64decode(data, validate=True)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return raw


def _embedded(page: Page) -> dict[str, bytes]:
    return {img["alt"]: _png(img["src"]) for img in page.imgs}


@pytest.fixture(scope="module")
def full_out(tmp_path_factory, explore_store):
    """A job folder as the main job leaves it: samples, probe figures, intervention grid."""
    from actstore.intervene.results import list_interventions
    from actstore.plots.figures import kind_comparison, probe_figures, sample_grid
    from actstore.plots.interventions import intervention_grid

    out = tmp_path_factory.mktemp("job")
    sample_grid(explore_store, "trained", str(out / "samples-trained.png"))
    for target in ("salient", "depth"):
        probe_figures(explore_store, target, str(out))
    kind_comparison(explore_store, str(out / "capture-kinds.png"))
    (exp,) = list_interventions(explore_store)
    intervention_grid(explore_store, exp, str(out / "intervention-salient.png"))
    return out


def test_full_report_embeds_every_figure_and_the_store_tables(full_out, explore_store):
    from actstore.intervene.results import list_interventions, open_intervention
    from actstore.probe.emergence import summary_table
    from actstore.probe.runs import open_emergence

    (full_out / "dose-salient.png").write_bytes((full_out / "salient-curves.png").read_bytes())
    extra = Section("Dose response", "A section added by one line.", figures=("dose-*.png",))
    path = write_report(full_out, explore_store, sections=SECTIONS + (extra,),
                        notes=["a note <b>escaped</b>"])
    assert path == str(full_out / "report.html")
    page = Page(Path(path).read_text(encoding="utf-8"))
    assert page.h2 == [s.title for s in SECTIONS] + ["Dose response"]
    embedded = _embedded(page)
    on_disk = {p.name: p.read_bytes() for p in full_out.glob("*.png")}
    # samples, 4 per target, the kind comparison, intervention, dose
    assert len(on_disk) == 1 + 2 * 4 + 1 + 1 + 1
    assert embedded == on_disk                       # every figure, each once, unaltered
    assert "Not in this run" not in "".join(page.text)
    assert "a note <b>escaped</b>" in page.text     # notes are text, never markup
    # the summary table shows the store's emergence rows, with their capture kind
    assert "kind" in page.cells                     # the header
    for row in summary_table(open_emergence(explore_store)):
        assert row["best_layer"] in page.cells and f"{row['trained']:.3f}" in page.cells
        assert row["kind"] in page.cells
    # the intervention table counts what the experiment holds
    (exp, summary), = list_interventions(explore_store).items()
    ds = open_intervention(explore_store, exp)
    assert summary["interventions"] == ds.sizes["image"] * ds.sizes["k"] == 2
    assert exp in page.cells and str(summary["interventions"]) in page.cells


def test_partial_job_gets_a_page_listing_what_is_absent(tmp_path, tiny_store):
    """A job on --images (no labels, probes or interventions) still gets its page."""
    from actstore.plots.figures import sample_grid

    sample_grid(tiny_store, "trained", str(tmp_path / "samples-trained.png"))
    path = write_report(tmp_path, tiny_store, notes=["--images covers part of the table"])
    page = Page(Path(path).read_text(encoding="utf-8"))
    assert page.h2 == ["Samples"]
    assert list(_embedded(page)) == ["samples-trained.png"]
    assert not page.cells
    absent = [s.title for s in SECTIONS if s.title != "Samples"]
    assert f"Not in this run: {', '.join(absent)}." in page.text


@pytest.mark.parametrize("where", ["no folder", "a folder without a store"])
def test_no_store_no_page(tmp_path, where):
    """`write_report("/tmp/nonexistent")` made the folder and an empty report.html and
    returned its path, as if the job had drawn nothing: refused, nothing created."""
    from actstore.errors import ActstoreError

    out = tmp_path / "nonexistent"
    if where != "no folder":
        out.mkdir()
        (out / "samples-trained.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(ActstoreError) as exc:
        write_report(out)
    assert str(exc.value) == (f"no report for {out}: store {out / 'store.zarr'}: does not "
                              "exist; create it with `actstore materialize`, or pass store= "
                              "where the job's store is")
    assert sorted(tmp_path.rglob("*")) == before
