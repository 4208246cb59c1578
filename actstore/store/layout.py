"""Every group path and attribute key of a store, in one place (``docs/store-format.md``).

Other modules never spell a store path or a marker key themselves: they call these
functions, so the layout can be read (and changed) here alone.
"""

from __future__ import annotations

# Attribute keys. A marker attribute is written last, in one PUT of its group's zarr.json:
# its presence is what makes the group's contents visible.
ROOT_KEY = "actstore"                   # root: schema, image count, block size, table hash
MODEL_KEY = "actstore_model"            # models/<variant>: fingerprint + provenance
CAPTURE_KEY = "actstore_capture"        # models/<variant>/captures/<kind>: a kind added later
BLOCK_KEY = "block"                     # <group>/_blocks/<a>-<b>: one finished image block
LABELS_COMMIT_KEY = "labels"            # labels/_commits/<id>: {target: its attributes}
LABEL_TARGET_KEY = "target"             # labels/<target> of stores written before commits
RUN_KEY = "target"                      # probes/<run>: the run's attributes (last)
SETTINGS_KEY = "settings"               # interventions/<id>: created (what a rerun must match)
SUMMARY_KEY = "actstore_intervention"   # interventions/<id>/_summary: complete (summary)
SWEEP_KEY = "sweep"                     # sweeps/<id>: the whole record, written once at the end
WRITER_KEY = "writer"                   # <...>/_pending: who is writing (host, pid, started)

IMAGES = "images"
MODELS = "models"
LAYERS = "layers"
CAPTURES = "captures"
BLOCKS = "_blocks"
LABELS = "labels"
COMMITS = "_commits"
PROBES = "probes"
SCORES = "scores"
EMERGENCE = "emergence"                 # written by stores of schema 1 before version 0.2
INTERVENTIONS = "interventions"
SWEEPS = "sweeps"
PENDING = "_pending"
SUMMARY = "_summary"
ACTIVATION = "activation"
ACTIVATION_UNCOND = "activation_uncond"
IMAGE_COLUMNS = ("image_id", "prompt", "seed", "split")
# an experiment's labelled axes: edit_stats' `stat`, edit_size's `measure` (the readers' own:
# importing them from the edits, which need torch, cost every `actstore show` 3 s)
STAT_NAMES = ("probe_error_before", "probe_error_after", "relative_change",
              "token_relative_change")
SIZE_MEASURES = ("overall", "token_median", "token_max")


def image_column(name: str) -> str:
    return f"{IMAGES}/{name}"


def model_path(variant: str) -> str:
    return f"{MODELS}/{variant}"


def layer_group(variant: str, layer: str) -> str:
    return f"{MODELS}/{variant}/{LAYERS}/{layer}"


def layer_path(variant: str, layer: str, name: str = ACTIVATION) -> str:
    return f"{layer_group(variant, layer)}/{name}"


def capture_group(variant: str, kind: str) -> str:
    """A capture kind added to a variant after its creation: its marker and records."""
    return f"{MODELS}/{variant}/{CAPTURES}/{kind}"


def blocks_path(group: str) -> str:
    return f"{group}/{BLOCKS}"


def block_record_path(group: str, start: int, stop: int) -> str:
    return f"{group}/{BLOCKS}/{start:08d}-{stop:08d}"


def parse_block_name(name: str) -> tuple[int, int] | None:
    try:
        a, b = name.split("-")
        return int(a), int(b)
    except ValueError:
        return None


def label_target_path(target: str) -> str:
    return f"{LABELS}/{target}"


def label_version_path(target: str, version: str) -> str:
    return f"{LABELS}/{target}/{version}"


def label_commit_path(commit_id: str) -> str:
    return f"{LABELS}/{COMMITS}/{commit_id}"


def run_path(run_id: str) -> str:
    return f"{PROBES}/{run_id}"


def run_layer_path(run_id: str, model: str, layer: str) -> str:
    return f"{PROBES}/{run_id}/{model}/{layer}"


def run_scores_path(run_id: str) -> str:
    return f"{PROBES}/{run_id}/{SCORES}"


def experiment_path(experiment_id: str) -> str:
    return f"{INTERVENTIONS}/{experiment_id}"


def experiment_summary_path(experiment_id: str) -> str:
    return f"{INTERVENTIONS}/{experiment_id}/{SUMMARY}"


def sweep_path(sweep_id: str) -> str:
    return f"{SWEEPS}/{sweep_id}"


def pending_path(path: str) -> str:
    return f"{path}/{PENDING}"


def parents(path: str) -> list[str]:
    """``a/b/c`` → ``["a", "a/b"]``: the groups above a node, outermost first."""
    parts = path.strip("/").split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]
