"""Which models and layers a probe run covers: refused in one line, before anything is
written, when a model is missing or incomplete or a point is not in every chosen model."""

from __future__ import annotations

from collections.abc import Sequence

from actstore.errors import ActstoreError
from actstore.store import core as st
from actstore.store.view import StoreView


def views_of(store: str, models: list[str] | None) -> list[StoreView]:
    """The chosen models' views (default: every model in the store), each complete: a run
    over a model still being materialized would score images that are not there yet."""
    st.read_root_attrs(store)       # a path that holds no store fails here, in one line
    have = st.model_variants(store)
    if not have:
        raise ActstoreError(f"store {store}: holds no complete model yet; finish `actstore "
                            "materialize` first")
    models = models or have
    st.check_variants(store, models, have, "materialize it first or drop it from --models")
    views = []
    for m in models:
        view = StoreView(store, m)
        missing = [f"{a}:{b}" for a, b in st.blocks_of(view.root_attrs["n_images"],
                                                        view.block_size)
                   if not view.complete[a:b].all()]
        if missing:
            # the default takes every variant: a control still being made stopped the run
            # with no word that the complete ones can be probed alone
            others = [o for o in models if o != m]
            alone = f", or probe the others alone (--models {' '.join(others)})" if others \
                else ""
            raise ActstoreError(f"store {store}: model {m!r} is incomplete (missing image blocks "
                                f"{', '.join(missing[:5])}); finish `actstore materialize` "
                                f"first{alone}")
        views.append(view)
    return views


def select(requested: Sequence | None, available: list, what: str, store: str) -> list:
    """``requested`` (default: all of ``available``), refused on the first it lacks."""
    if not requested:
        return list(available)
    bad = [r for r in requested if r not in available]
    if bad:
        raise ActstoreError(f"store {store}: no {what} {bad[0]!r}; available: "
                            f"{', '.join(map(str, available))}")
    return list(requested)


def check_in_every_model(store: str, requested: Sequence[str] | None, common: list[str],
                          views: list[StoreView]) -> None:
    """A point some of the chosen models have and others lack (a kind added to the trained
    model only) was refused as 'no layer', its name missing from the list given, although
    `actstore show` lists it: say which model lacks it, and the two ways on. By default
    (every point) the grid took the points all models have and left the others out
    without a word, so that is refused too, saying how many."""
    left = list(dict.fromkeys(la for v in views for la in v.points if la not in common))
    for layer in requested or left[:1]:
        having = [v.model for v in views if layer in v.points]
        if layer in common or not having:
            continue
        lacking = [v.model for v in views if layer not in v.points]
        kind = layer.partition("/")[0] if "/" in layer else "attn1"
        short = next(v for v in views if v.model == lacking[0])
        control = " --control randomized" if short.model == "randomized" else ""
        default = "" if requested else (
            f"by default probe takes every point of every model, and {len(left)} points are "
            "not in every model: pass --layers naming points they all have, ")
        raise ActstoreError(
            f"store {store}: model {', '.join(lacking)} has no point {layer!r} (model "
            f"{', '.join(having)} has it); {default or 'pass '}--models {' '.join(having)}, "
            f"or add the kind there first (`actstore materialize{control} --capture "
            f"{','.join([*short.kinds, kind])}` with the store's model and prompts)")
