"""The dataset card and the shard list: what makes an output folder a dataset that Hugging Face
`datasets` loads (`load_dataset(OUT)`) and the hub publishes as it is.

`OUT/README.md` (the card) is YAML front matter, then a short description:
- `configs`: one config, `default`, split `train`, data files `data/*/*.parquet` (or `*.tar`): the
  data shards only, never the output's metadata (`_index.parquet`, `_runs/`), `errors/` or
  `report.html`, which `datasets` would otherwise read as rows;
- `dataset_info.features`: every column with its type, as `datasets.Features.from_arrow_schema`
  gives them and `Features._to_yaml_list` writes them (the `image` column an Image feature). For
  WebDataset shards, the members as `datasets`' webdataset builder names them (`__key__`, the
  image's extension, `txt`, and `json` with every column's JSON type, pipelines/shards.py): no type
  is guessed from the first samples, where a column may still be all null.
The engine writes the YAML itself (PyYAML): `datasets` is not needed at run time, and
tests/test_card.py compares the features with what `datasets` derives from the same schema.

`OUT/shards.txt` lists the data shards that hold rows, one path relative to OUT per line, in
manifest order: a WebDataset reader's shard list (`wds.WebDataset(urls)`).

Both describe an output that passed its check, so they are written after `_SUCCESS.json`, by the
run that wrote it (jobs/summary.py), never before. A README.md without `MARKER` was written by
someone else: it is left as it is (and --overwrite keeps it), and the run says so once.
"""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import yaml

from kandinsky_engine.columns import engine_version

from .output import CARD, DATA, SHARD_LIST, put_bytes
from .shards import FORMATS, EXTENSIONS, json_type

log = logging.getLogger("kandinsky_engine")

MARKER = "<!-- kandinsky-batch dataset card: rewritten after each run that completes; delete this line to keep your edits -->"
SPLIT = "train"
# datasets' names of the Arrow types whose string form differs from theirs (datasets.features._arrow_to_datasets_dtype).
DTYPE_NAMES = {"halffloat": "float16", "float": "float32", "double": "float64", "date32[day]": "date32",
               "date64[ms]": "date64"}
PRIMITIVE = (pa.types.is_null, pa.types.is_boolean, pa.types.is_integer, pa.types.is_floating, pa.types.is_temporal,
             pa.types.is_decimal, pa.types.is_string, pa.types.is_large_string, pa.types.is_binary,
             pa.types.is_large_binary, pa.types.is_fixed_size_binary, pa.types.is_string_view,
             pa.types.is_binary_view)


class NoFeature(ValueError):
    """An Arrow type that `datasets` has no feature for (a map, a union, an extension type)."""


def feature(type_: pa.DataType) -> dict:
    """One column's feature in the card's YAML, in datasets' own form: {dtype: int64},
    {list: float32}, {struct: [{name, dtype}...]}..."""
    if pa.types.is_struct(type_):
        return {"struct": [{"name": f.name, **feature(f.type)} for f in type_]}
    if pa.types.is_list(type_) or pa.types.is_large_list(type_) or pa.types.is_fixed_size_list(type_):
        inner = feature(type_.value_type)
        if list(inner) in (["dtype"], ["struct"]):  # datasets writes `list: float32`, `list: [fields]`
            inner = next(iter(inner.values()))
        out = {"large_list" if pa.types.is_large_list(type_) else "list": inner}
        if pa.types.is_fixed_size_list(type_):
            out["length"] = type_.list_size
        return out
    if pa.types.is_dictionary(type_):  # datasets reads a dictionary column as its values
        return feature(type_.value_type)
    if not any(check(type_) for check in PRIMITIVE):
        raise NoFeature(f"{type_} has no Hugging Face `datasets` feature")
    return {"dtype": DTYPE_NAMES.get(str(type_), str(type_))}


def image_columns(schema: pa.Schema) -> set[str]:
    """Columns the schema's `huggingface` metadata declares Image features."""
    meta = json.loads((schema.metadata or {}).get(b"huggingface", b"{}"))
    features = (meta.get("info") or {}).get("features") or {}
    return {name for name, f in features.items() if isinstance(f, dict) and f.get("_type") == "Image"}


def features(schema: pa.Schema, output_format: str, image_format: str) -> list[dict]:
    """The card's `dataset_info.features` for data shards of `schema` in `output_format`."""
    images = image_columns(schema)
    columns = [{"name": f.name, **({"dtype": "image"} if f.name in images else feature(f.type))} for f in schema]
    if output_format == "parquet":
        return columns
    # The members of a sample, as datasets' webdataset builder names them (by extension).
    metadata = [{"name": f.name, **feature(json_type(f.type))} for f in schema if f.name != "image"]
    return [{"name": "__key__", "dtype": "string"}, {"name": EXTENSIONS[image_format], "dtype": "image"},
            {"name": "txt", "dtype": "string"}, {"name": "json", "struct": metadata}]


def front_matter(schema: pa.Schema, output_format: str, image_format: str, title: str) -> dict:
    """The card's YAML metadata. Features are left out, with a warning, where a column has none
    (`datasets` then infers them, as it would without a card)."""
    card = {"pretty_name": title, "task_categories": ["text-to-image"], "tags": ["kandinsky-engine", "synthetic"],
            "configs": [{"config_name": "default", "default": True,
                         "data_files": [{"split": SPLIT, "path": f"{DATA}/*/*.{FORMATS[output_format].ext}"}]}]}
    try:
        card["dataset_info"] = {"config_name": "default",
                                "features": features(schema, output_format, image_format)}
    except NoFeature as exc:
        log.warning("dataset card: written without features (%s); `datasets` infers the column types", exc)
    return card


def card_text(schema: pa.Schema, config, summary: dict, identity: dict, title: str) -> str:
    """The whole README.md: front matter, the marker, what the dataset is and how to load it."""
    output = config.output
    meta = yaml.safe_dump(front_matter(schema, output.format, output.image_format, title), sort_keys=False,
                          allow_unicode=True)
    models = ", ".join(f"`{v}`" for k, v in identity.items() if k.endswith("_model") and v)
    state = "" if summary.get("complete") else " (a partial run: rows of its manifest are still to run)"
    image = EXTENSIONS[output.image_format]
    sample = ('ds[0]["image"]  # a PIL image' if output.format == "parquet"
              else f'ds[0]["{image}"], ds[0]["txt"], ds[0]["json"]["seed"]  # a PIL image, the prompt, the metadata')
    columns = "\n".join(f"| `{f.name}` | `{f.type}` |" for f in schema if f.name != "image")
    return (f"---\n{meta}---\n{MARKER}\n\n# {title}\n\n"
            f"{summary['rows']} images generated by kandinsky-engine {engine_version()}{state} with {models} "
            f"(`model_revision` {identity.get('model_revision')}); {summary['failed_rows']} row(s) failed and are "
            f"not in it. Data: {summary['shards']} {output.format} shard(s) under `{DATA}/`, listed in "
            f"`{SHARD_LIST}`.\n\n"
            f"```python\nimport datasets\n\nds = datasets.load_dataset(PATH, split=\"{SPLIT}\")  # this folder, or its "
            f"hub repository id\n{sample}\n```\n\n"
            "Each row holds its image, its resolved generation parameters (seed included), the weights it was made "
            "with (`*_model`, `model_revision`), `engine_version` and `created_at` (when its image was made)"
            + ("" if output.format == "parquet" else f"; in WebDataset shards the image is `<key>.{image}`, the prompt "
               "`<key>.txt` and every other column is in `<key>.json`") + ".\n\n"
            f"| column | Arrow type |\n|---|---|\n| `image` | Image ({output.image_format}) |\n{columns}\n")


def card_is_ours(fs, root: str) -> bool:
    """Whether the output's README.md is missing or was written by this tool (carries MARKER)."""
    try:
        return MARKER.encode() in fs.cat_file(f"{root}/{CARD}")
    except FileNotFoundError:
        return True


def write_card(fs, root: str, config, schema: pa.Schema, summary: dict, records: list[dict], identity: dict,
               tag: str) -> bool:
    """Write the shard list and, unless a README.md of someone else's is there, the card. Returns
    whether the card was written."""
    shards = sorted(r["file"] for r in records if r["file"].startswith(f"{DATA}/") and r.get("rows"))
    put_bytes(fs, root, SHARD_LIST, "".join(f"{s}\n" for s in shards).encode(), tag)
    if not card_is_ours(fs, root):
        log.warning("%s/%s was not written by this tool: left as it is, so the output has no generated dataset "
                    "card (`datasets.load_dataset` needs its configs and features: see docs/outputs.md)", root, CARD)
        return False
    title = root.rstrip("/").rsplit("/", 1)[-1]
    put_bytes(fs, root, CARD, card_text(schema, config, summary, identity, title).encode(), tag)
    return True
