"""Selections that name what there is: a mistyped label in a reader's ``.sel`` says which
values the coordinate has.

xarray answers ``open_emergence(u).score.sel(metric="rmse")`` (the metric is
``rmse_label``), ``view[layer].sel(step=15)`` on a 15-step store or ``.sel(image="toy-999")``
with ``KeyError: "not all values found in index 'metric'. Try setting the `method`
keyword argument (example: method='nearest')"``: it names neither the value asked for nor
the values there are, and suggests a nearest match, which for a metric or an image id is
wrong. Every labelled dimension of the objects actstore's readers return carries
:class:`ChoiceIndex` instead, pandas' index with that one message changed; selecting,
slicing, ``method=`` and alignment behave as before.
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
from xarray.indexes import PandasIndex

from actstore.errors import ActstoreError

Labelled = TypeVar("Labelled")
SHOWN = 20   # values listed in the message; a store's image ids may run to 60,000


class UnknownLabel(ActstoreError, KeyError):
    """A label a coordinate does not have: still a KeyError (what code catching xarray's
    error expects) and an ActstoreError (one line, what to choose from)."""

    def __str__(self) -> str:   # KeyError's str() is the repr of its message, quotes and all
        return str(self.args[0])


class ChoiceIndex(PandasIndex):
    """pandas' index for one dimension, whose failed ``sel`` names the missing labels and
    the coordinate's values (the first :data:`SHOWN` and their count if there are more)."""

    def sel(self, labels: dict[Any, Any], method=None, tolerance=None):
        try:
            return super().sel(labels, method=method, tolerance=tolerance)
        except KeyError as e:
            if isinstance(e, UnknownLabel):
                raise
            (name, asked), = labels.items()
            raise UnknownLabel(self._message(name, asked, method)) from None

    def _message(self, name: Any, asked: Any, method: Any) -> str:
        values = [_plain(v) for v in self.index]
        wanted = [_plain(v) for v in np.ravel(np.asarray(getattr(asked, "values", asked),
                                                          dtype=object))]
        have = set(values)
        missing = [v for v in wanted if v not in have] or wanted
        listed = ", ".join(repr(v) for v in values[:SHOWN])
        more = f", ... ({len(values)} in all)" if len(values) > SHOWN else ""
        near = "" if method is None else f" within method={method!r}"
        return (f"no {name} {', '.join(repr(v) for v in missing[:SHOWN])}{near}; "
                f"{name} is one of {listed or 'nothing (empty)'}{more}")


def _plain(value: Any) -> Any:
    """numpy scalars shown as Python ones (``np.int64(3)`` as ``3``, ``np.str_`` as str)."""
    return value.item() if isinstance(value, np.generic) else value


def with_choices(obj: Labelled) -> Labelled:
    """``obj`` (an xarray Dataset or DataArray) with :class:`ChoiceIndex` on each dimension
    that has a plain pandas index; values, chunks and attributes untouched."""
    dims = [d for d, index in obj.xindexes.items()
            if type(index) is PandasIndex and index.index.nlevels == 1 and d in obj.dims]
    for dim in dims:
        obj = obj.drop_indexes(dim).set_xindex(dim, ChoiceIndex)
    return obj
