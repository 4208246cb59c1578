"""catalog.yaml: the shipped catalog validates and resolves; every kind of mistake is one
line naming the key path."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from actstore.catalog import (SCHEMA_PATH, Catalog, load_catalog, resolve_guidance,
                              resolve_model, resolve_prompts, resolve_store)
from actstore.errors import ActstoreError
from actstore.generation.prompts import load_prompts

REPO = Path(__file__).resolve().parent.parent
CATALOG = REPO / "catalog.yaml"
DEMO = REPO / "prompts" / "demo.csv"

MINIMAL = """
models:
  tiny-random:
    builtin: tiny-random
  toy-ldm:
    path: models/toy-ldm
prompt_sets:
  demo:
    path: prompts/demo.csv
stores:
  toy:
    uri: runs/toy.zarr
    model: toy-ldm
    prompts: demo
    steps: 10
"""


def catalog_at(tmp_path: Path, text: str = MINIMAL) -> Catalog:
    path = tmp_path / "catalog.yaml"
    path.write_text(text, encoding="utf-8")
    return load_catalog(path)


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ActstoreError) as info:
        catalog_at(tmp_path, text)
    message = str(info.value)
    assert "\n" not in message, message
    return message.split(": ", 1)[1]  # drop the file path


# --- the shipped catalog ----------------------------------------------------------------

def test_schema_is_valid_draft_2020_12_and_closed() -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"].endswith("/draft/2020-12/schema")

    def closed(node: object) -> None:  # every object schema forbids unknown keys
        if isinstance(node, dict):
            if node.get("type") == "object":
                assert "additionalProperties" in node, node
                assert node["additionalProperties"] is False or "propertyNames" in node
            for value in node.values():
                closed(value)
        elif isinstance(node, list):
            for value in node:
                closed(value)
    closed(schema)


def test_repo_catalog_validates_and_names_the_expected_entries() -> None:
    catalog = load_catalog(CATALOG)
    assert {"tiny-random", "toy-ldm", "sd-v1-4"} <= set(catalog.models)
    assert {"demo", "toyworld"} <= set(catalog.prompt_sets)
    assert "toy" in catalog.stores
    assert catalog.models["tiny-random"]["builtin"] == "tiny-random"
    assert len(load_prompts(resolve_prompts(catalog, "demo"))) >= 12


def test_repo_catalog_resolves_relative_to_its_folder(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    monkeypatch.delenv("SD14_PATH", raising=False)
    catalog = load_catalog(CATALOG)
    toy = resolve_model(catalog, "toy-ldm")
    assert toy["kind"] == "path" and toy["ref"] == str(REPO / "models" / "toy-ldm")
    assert resolve_model(catalog, "tiny-random")["kind"] == "builtin"
    sd = resolve_model(catalog, "sd-v1-4")
    assert sd["ref"] == str(Path("~/models/stable-diffusion-v1-4").expanduser())
    monkeypatch.setenv("SD14_PATH", str(tmp_path / "sd14"))
    assert resolve_model(catalog, "sd-v1-4")["ref"] == str(tmp_path / "sd14")
    store = resolve_store(catalog, "toy")
    assert store["uri"] == str(REPO / "runs" / "toy.zarr")
    assert (store["model"], store["prompts"]) == ("toy-ldm", "toyworld")
    assert resolve_prompts(catalog, "toyworld") == str(REPO / "prompts" / "toyworld.csv")


# --- resolving names and pass-through ---------------------------------------------------

def test_resolve_model_passes_non_names_through(tmp_path: Path) -> None:
    catalog = catalog_at(tmp_path)
    (tmp_path / "folder").mkdir()
    assert resolve_model(catalog, str(tmp_path / "folder")) == {
        "name": None, "kind": "path", "ref": str(tmp_path / "folder"), "revision": None,
        "dtype": None, "guidance": None, "description": None}
    hub = resolve_model(catalog, "CompVis/stable-diffusion-v1-4")
    assert (hub["kind"], hub["ref"]) == ("hf_id", "CompVis/stable-diffusion-v1-4")
    assert resolve_model(None, "tiny-random")["kind"] == "builtin"
    assert resolve_model(None, "./not-yet")["kind"] == "path"
    with pytest.raises(ActstoreError, match=r"unknown model 'toyldm'.*toy-ldm"):
        resolve_model(catalog, "toyldm")


def test_guidance_comes_from_flag_then_store_then_model_then_sd() -> None:
    catalog = load_catalog(CATALOG)
    toy, sd = resolve_model(catalog, "toy-ldm"), resolve_model(catalog, "sd-v1-4")
    assert toy["guidance"] == 3.0 and sd["guidance"] is None
    toy_store, sd_store = resolve_store(catalog, "toy"), resolve_store(catalog, "sd14-demo")
    assert resolve_guidance(None, toy_store, toy) == 3.0   # the model's, via its store
    assert resolve_guidance(None, {}, toy) == 3.0           # the main job: no store entry
    assert resolve_guidance(5.0, toy_store, toy) == 5.0     # --guidance wins
    assert resolve_guidance(None, {"guidance": 4.0}, toy) == 4.0
    assert resolve_guidance(None, sd_store, sd) == 7.5      # the paper's, written out
    assert resolve_guidance(None, {}, resolve_model(None, "tiny-random")) == 7.5
    assert resolve_guidance(5.0, {"guidance": 4.0}, toy) == 5.0
    assert resolve_guidance(0.0, {"guidance": 4.0}, toy) == 0.0  # 0 is a value, not "unset"
    # a folder path that is a catalog model's folder gets that entry's settings
    assert resolve_model(catalog, str(REPO / "models" / "toy-ldm"))["guidance"] == 3.0
    for bad, source in [(float("nan"), "--guidance"), (-1.0, "--guidance")]:
        with pytest.raises(ActstoreError, match=f"guidance .* \\(from {source}\\): must be a finite"):
            resolve_guidance(bad, toy_store, toy)
    with pytest.raises(ActstoreError, match=r"from the model entry\): must be a finite"):
        resolve_guidance(None, {}, {"guidance": float("inf")})


def test_resolve_store_and_prompts_pass_through(tmp_path: Path) -> None:
    catalog = catalog_at(tmp_path)
    assert resolve_store(catalog, "toy")["steps"] == 10
    assert resolve_store(catalog, "toy")["guidance"] is None  # caller's default applies
    plain = resolve_store(catalog, "s3://bucket/x.zarr")
    assert plain["uri"] == "s3://bucket/x.zarr" and plain["name"] is None
    assert resolve_prompts(catalog, "other.parquet") == "other.parquet"
    assert resolve_prompts(None, "memory://x/p.csv") == "memory://x/p.csv"
    with pytest.raises(ActstoreError, match=r"unknown prompt set 'dem'.*demo"):
        resolve_prompts(catalog, "dem")


def test_unset_environment_variable_without_default(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ACTSTORE_NOPE", raising=False)
    catalog = catalog_at(tmp_path, MINIMAL.replace("models/toy-ldm", "${ACTSTORE_NOPE}/m"))
    with pytest.raises(ActstoreError, match=r"models.toy-ldm.path: environment variable "
                                            r"'ACTSTORE_NOPE' is not set"):
        resolve_model(catalog, "toy-ldm")


# --- bad catalogs -----------------------------------------------------------------------

@pytest.mark.parametrize("old,new,expected", [
    ("    path: models/toy-ldm", "    pth: models/toy-ldm",
     "models.toy-ldm: unknown key 'pth' (allowed: path, hf_id, revision, builtin, dtype, "
     "guidance, description); did you mean 'path'?"),
    ("    path: models/toy-ldm", "    path: models/toy-ldm\n    guidance: strong",
     "models.toy-ldm: 'guidance' must be a number, got 'strong'"),
    ("    path: models/toy-ldm", "    path: models/toy-ldm\n    guidance: -2",
     "models.toy-ldm: 'guidance' must be >= 0, got -2"),
    ("    path: models/toy-ldm", "    path: models/toy-ldm\n    guidance: true",
     "models.toy-ldm: 'guidance' must be a number, got true"),
    ("models:", "modles:", "top level: unknown key 'modles'"),
    ("    uri: runs/toy.zarr\n", "", "stores.toy: missing required key 'uri'"),
    ("    steps: 10", "    steps: ten", "stores.toy: 'steps' must be an integer, got 'ten'"),
    ("    steps: 10", "    steps: 0", "stores.toy: 'steps' must be >= 1, got 0"),
    ("    steps: 10", "    guidance: high", "stores.toy: 'guidance' must be a number, got 'high'"),
    ("    steps: 10", "    height: 500", "stores.toy: 'height' must be a multiple of 8, got 500"),
    ("    builtin: tiny-random", "    builtin: tiny",
     "models.tiny-random: 'builtin' must be one of: tiny-random; got 'tiny'"),
    ("    builtin: tiny-random", "    builtin: tiny-random\n    path: x",
     "models.tiny-random: needs exactly one of 'path', 'hf_id' or 'builtin'"),
    ("    builtin: tiny-random", "    description: nothing to load",
     "models.tiny-random: needs exactly one of"),
    ("    path: models/toy-ldm", "    path: models/toy-ldm\n    dtype: fp16",
     "models.toy-ldm: 'dtype' must be one of: float32, float16; got 'fp16'"),
    ("    path: models/toy-ldm", "    hf_id: just-a-name",
     "models.toy-ldm: 'hf_id' must be a Hugging Face repo id of the form 'org/name'"),
    ("  toy-ldm:", "  toy.ldm:", "models: bad name 'toy.ldm'"),
    ("  tiny-random:\n    builtin: tiny-random", "  tiny-random: tiny-random",
     "models: 'tiny-random' must be an object, got 'tiny-random'"),
    ("prompt_sets:\n  demo:\n    path: prompts/demo.csv", "prompt_sets: [prompts/demo.csv]",
     "top level: 'prompt_sets' must be an object"),
    ("    model: toy-ldm", "    model: toy-ldn",
     "stores.toy: 'model' names unknown model 'toy-ldn' (catalog has: tiny-random, toy-ldm)"),
    ("    prompts: demo", "    prompts: demos",
     "stores.toy: 'prompts' names unknown prompt set 'demos' (catalog has: demo)"),
])
def test_bad_catalog_names_the_key(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert old in MINIMAL
    assert error_of(tmp_path, MINIMAL.replace(old, new)).startswith(expected)


def test_yaml_level_mistakes(tmp_path: Path) -> None:
    assert error_of(tmp_path, "models: [unclosed\n").startswith("line 2, column 1: invalid YAML")
    assert error_of(tmp_path, "- a list\n") == "top level must be an object, got [\"a list\"]"
    assert error_of(tmp_path, "") == "top level: missing required key 'models'"
    dup = MINIMAL.replace("prompt_sets:", "  tiny-random:\n    builtin: tiny-random\nprompt_sets:")
    assert error_of(tmp_path, dup).startswith("line 7: duplicate key 'tiny-random' (first on line 3)")


def test_yaml_tags_that_build_objects_are_refused(tmp_path: Path) -> None:
    message = error_of(tmp_path, "models: !!python/object/apply:os.system ['echo hi']\n")
    assert "invalid YAML" in message


def test_missing_catalog_file(tmp_path: Path) -> None:
    with pytest.raises(ActstoreError, match=r"nope.yaml: cannot read catalog"):
        load_catalog(tmp_path / "nope.yaml")


def test_materialize_uses_the_catalog_models_guidance(tmp_path: Path) -> None:
    """End to end through the CLI: a store entry without guidance gets its model's, and
    the store records what was used; --guidance still wins (a second store)."""
    from flows.cli import main
    from actstore.store.core import model_attrs

    (tmp_path / "catalog.yaml").write_text(
        "models:\n  tiny:\n    builtin: tiny-random\n    guidance: 2.5\n"
        f"prompt_sets:\n  demo:\n    path: {DEMO}\n"
        "stores:\n  s:\n    uri: s.zarr\n    model: tiny\n    prompts: demo\n    steps: 2\n")
    common = ["--catalog", str(tmp_path / "catalog.yaml"), "--no-prefect", "--quiet"]
    assert main(common + ["materialize", "--store", "s", "--images", "0:4"]) == 0
    assert model_attrs(str(tmp_path / "s.zarr"), "trained")["guidance"] == 2.5
    other = str(tmp_path / "t.zarr")
    assert main(common + ["materialize", "--store", other, "--model", "tiny", "--prompts",
                          "demo", "--steps", "2", "--images", "0:4", "--guidance", "6"]) == 0
    assert model_attrs(other, "trained")["guidance"] == 6.0
