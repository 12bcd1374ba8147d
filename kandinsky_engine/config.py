"""Job configuration: one documented pydantic model per concern, loaded from YAML.

`load_config(path, overrides)` is the single place where defaults are resolved; the CLI's
`--set a.b=value` overrides are parsed against their field's type and applied before validation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .config_errors import ConfigError, from_validation, read_yaml, unknown_key
from .limits import DEFAULT_MAX_INPUT_BYTES, DEFAULT_MAX_PIXELS, DEFAULT_READ_TIMEOUT_S
from .sampling import SCHEDULERS
from .uri_policy import canonical

TINY = "tiny"
HUB_PRIOR = "kandinsky-community/kandinsky-2-2-prior"
HUB_DECODER = "kandinsky-community/kandinsky-2-2-decoder"
HUB_DEPTH = "Intel/dpt-hybrid-midas"
# Every task of every family; which ones a job's weights can run is the family's (kandinsky_engine/families/).
TASKS = ("text2img", "img2img", "mix", "variation", "inpaint", "controlnet", "controlnet_img2img")
# Opt-in per-row output columns (output.columns), in the order they are written.
SIGNAL_COLUMNS = ("image_embeds", "clip_score", "sha256", "phash")


class _Strict(BaseModel):
    # A typo in a YAML key must be an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    """Where the weights come from and how they run."""

    prior: str = Field(
        HUB_PRIOR,
        description="Prior pipeline (Kandinsky 2.x; unused by 3): a hub id (default: the released Kandinsky 2.2 "
        "prior; `repo@revision` pins a branch, tag or commit), a local diffusers-layout directory, a remote one "
        "(s3://..., any fsspec URL; mirrored once per node into cache_dir), or 'tiny' / 'tiny-k21' (random "
        "weights built offline, for tests and the demo: their images are noise).",
    )
    decoder: str = Field(
        HUB_DECODER,
        description="Decoder pipeline (U-Net + MoVQ; with Kandinsky 2.1 and 3 also the text encoder): its "
        "model_index.json names the model family. 'tiny', 'tiny-inpaint' or 'tiny-controlnet' (2.2), 'tiny-k21' "
        "or 'tiny-k21-inpaint' (2.1), 'tiny-k3' (3), 'tiny-k20' or 'tiny-k20-inpaint' (2.0), a local "
        f"or remote directory, or a hub id (default '{HUB_DECODER}'; also '{HUB_DECODER}-inpaint' or "
        "'kandinsky-community/kandinsky-2-2-controlnet-depth').",
    )
    depth: str = Field(
        HUB_DEPTH,
        description=f"Depth estimator for ControlNet rows without a hint: a hub id (default '{HUB_DEPTH}'), a "
        "local or remote transformers directory, or 'tiny'.",
    )
    revision: str | None = Field(
        None, description="Hub revision (branch, tag or commit) of every hub id that does not name its own "
        "(`repo@revision`); default 'main'. The driver resolves it to a commit, which every actor loads and the "
        "fingerprint and every row's *_model column record, so a job never resumes into other weights.",
    )
    family: str = Field(
        "auto", description="Model family: 'kandinsky22', 'kandinsky21', 'kandinsky3' or 'kandinsky20', or 'auto' (default): "
        "the family whose diffusers pipeline model.decoder's model_index.json names (`_class_name`). See README, "
        "Model families.",
    )
    device: str = Field("auto", description="torch device for every stage: 'auto' (default: 'cuda' when the job's "
                        "stages reserve GPUs, num_gpus > 0, else 'cpu'), 'cpu', 'cuda' or 'cuda:N'.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Weights and activations dtype: 'auto' (default: bfloat16 on a GPU, float32 on a CPU; "
        "a GPU without bfloat16 refuses to start, naming the choice), or 'float32', 'float16', 'bfloat16' (the "
        "last two need a GPU)."
    )
    channels_last: bool = Field(
        False, description="Run the U-Net and the MoVQ in channels_last memory format (faster convolutions on "
        "tensor-core GPUs). Changes float results within the batch-shape tolerance; see README, Performance.",
    )
    compile: bool = Field(
        False, description="torch.compile the U-Net and the MoVQ decode, one static graph per batch-size bucket "
        "(powers of two up to the stage's U-Net or decode batch), compiled and warmed up when an actor starts; "
        "batches are padded up to their bucket and shapes that were not warmed up run eagerly, so nothing "
        "recompiles during the job. Changes float results within the batch-shape tolerance; see README, Performance.",
    )
    cache_dir: str = Field(
        default_factory=lambda: os.environ.get("KANDINSKY_CACHE", str(Path.home() / ".cache" / "kandinsky-engine")),
        description="Local cache for built or downloaded models (env KANDINSKY_CACHE); remote model "
        "directories are mirrored under cache_dir/remote/.",
    )
    digest_max_age_s: float = Field(
        86400.0, gt=0, description="Local manifest files and model directories are identified by the sha256 of "
        "their bytes, cached in cache_dir/digests/ while a file's size, mtime, ctime, inode and device are "
        "unchanged; a cached digest older than this is computed again. `verify` always reads the bytes.",
    )

    @model_validator(mode="after")
    def _half_needs_gpu(self):
        if self.dtype in ("float16", "bfloat16") and self.device.startswith("cpu"):
            raise ValueError(f"model.dtype={self.dtype} needs a cuda device, got model.device={self.device!r}")
        return self


class StageConfig(_Strict):
    """Scheduling of one model stage: a pool of actors that keep the model resident."""

    batch_size: int = Field(4, ge=1, description="Rows per call of the stage.")
    actors: int = Field(1, ge=1, description="Actor pool size (model replicas).")
    num_cpus: float = Field(
        0.2,
        gt=0,
        description="Ray CPUs reserved per actor: a scheduling share, not a thread count. The actors of all "
        "stages may reserve at most (cluster CPUs - 1); the default fits all five stages on 2 CPUs.",
    )
    num_gpus: float = Field(0.0, ge=0, description="Ray GPUs reserved per actor (fractions share one GPU).")
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="torch intra-op threads per actor; default max(1, round(num_cpus)). Ray sets "
        "OMP_NUM_THREADS from num_cpus, so the engine sets this explicitly.",
    )

    gpu_memory_fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Cap of each actor's CUDA memory, as a share of its GPU (torch.cuda.set_per_process_memory_fraction"
        "), so that actors sharing a GPU cannot take each other's memory; default num_gpus when it is a fraction "
        "(below 1), else no cap.",
    )

    max_tasks_in_flight: int | None = Field(
        None,
        ge=1,
        description="Blocks Ray Data sends to one actor at a time (ActorPoolStrategy's "
        "max_tasks_in_flight_per_actor): at 2 the next block's inputs arrive while the actor computes the "
        "current one. Default: Ray's (2 for these one-call-at-a-time actors on Ray 2.60). `kandinsky-batch plan` "
        "sets 2 for the U-Net.",
    )

    def threads(self) -> int:
        return self.torch_threads or max(1, round(self.num_cpus))


class GenerationDefaults(_Strict):
    """Job-level generation parameters; a manifest column of the same name overrides per row
    (except `scheduler`, which is per job).

    Defaults are those of the diffusers reference pipelines.
    """

    task: Literal[TASKS] = Field("text2img", description=f"Task of rows without a `task` column: one of {TASKS}.")
    seed: int = Field(0, ge=0, description="Job seed: a row without `seed` gets one derived from (seed, id).")
    negative_prompt: str | None = Field(
        None, description="Negative prompt; None means the zero-image embedding, as in diffusers."
    )
    width: int = Field(512, ge=1, description="Output width in pixels.")
    height: int = Field(512, ge=1, description="Output height in pixels.")
    num_inference_steps: int = Field(100, ge=1, description="Decoder (U-Net) denoising steps.")
    guidance_scale: float = Field(4.0, description="Decoder classifier-free guidance; > 1 enables it.")
    prior_num_inference_steps: int = Field(
        25, ge=2, description="Prior denoising steps; at least 2 (diffusers' UnCLIPScheduler divides by steps - 1)."
    )
    prior_guidance_scale: float = Field(4.0, description="Prior classifier-free guidance; > 1 enables it.")
    strength: float = Field(
        0.3, ge=0, le=1, description="img2img and variation: the share of the schedule re-run from the input "
        "(1 = ignore it), as diffusers."
    )
    task_defaults: dict[Literal[TASKS], dict[str, int | float]] = Field(
        default_factory=dict,
        description="Per-task defaults, {task: {field: value}}, for rows of that task without the column, e.g. "
        "{img2img: {guidance_scale: 7.0}}. The model family fills in its pipelines' own (Kandinsky 2.1's img2img "
        "guides at 7.0) unless the field is set here or above.",
    )
    scheduler: Literal[(*SCHEDULERS, "plms")] = Field(
        "ddpm",
        description="Decoder sampler, for the whole job: 'ddpm' (the model's own DDPMScheduler), 'ddim', 'dpmpp' "
        "(DPM-Solver++ multistep), 'unipc' or 'euler', each built from the decoder's scheduler config as "
        "diffusers swaps schedulers. The deterministic ones give comparable images in 20-30 steps instead of "
        "100. The prior always runs its UnCLIPScheduler (see README, Performance). Kandinsky 2.0 runs its "
        "original repository's samplers: 'ddpm' (p_sampler), 'ddim' (its default) or 'plms' (docs/kandinsky20.md).",
    )
    ddim_eta: float | None = Field(
        None, ge=0, description="Kandinsky 2.0's DDIM eta (the noise of each step; 0 is deterministic); None: the "
        "family's default, 0.05 as the original's generate_* functions (which ignore it and run 0). Unused by the "
        "other families, whose DDIM runs with eta 0 as their diffusers pipelines.",
    )


class InputConfig(_Strict):
    """The manifest: Parquet file, directory or glob."""

    manifest: str = Field(..., description="Path or URL of the Parquet manifest (file, directory or glob).")
    rows_per_block: int | None = Field(
        None,
        ge=1,
        description="Rows per unit of work: units are consecutive rows of one manifest file, each stage splits a unit into its own "
        "batch size (so a row's batch-mates never vary between runs), and a unit is committed as one data shard "
        "(so it is also the shard size and the most work a crash can lose per in-flight unit). Default: 8 x the "
        "largest stage batch size. Smaller units let the stages overlap sooner; larger ones make fewer files.",
    )
    max_image_pixels: int = Field(
        DEFAULT_MAX_PIXELS, ge=1, description="Input images above this many pixels are refused (decompression bombs), "
        "checked from the header before decoding."
    )
    allowed_uri_prefixes: list[str] = Field(
        default_factory=list,
        description="Where input URIs (image_uri, mask_uri, hint_uri, mix image_uri) may point besides the "
        "manifest's own location (the folder of a file manifest, the folder itself, or a glob's part before its "
        "first wildcard), e.g. ['s3://bucket/images/', '/data/inputs', 'https://cdn.example.com/img/']. Matched "
        "on whole path segments; local paths after resolving symlinks; '..' segments are always refused. Other "
        "buckets, local files, http(s), chained URLs ('a::b') and other schemes are refused unless listed. "
        "Allowed inputs are read with the job's storage_options and environment credentials.",
    )
    max_input_bytes: int = Field(
        DEFAULT_MAX_INPUT_BYTES, ge=1, description="Input files (and inline *_bytes values) larger than this are "
        "refused; at most this many bytes + 1 are read. Default 64 MiB."
    )
    read_timeout_s: float = Field(
        DEFAULT_READ_TIMEOUT_S, gt=0, description="Seconds within which one input file must be read, else its row "
        "fails. Default 60."
    )
    max_steps: int = Field(
        1000, ge=1, description="Rows with more num_inference_steps or prior_num_inference_steps than this are "
        "refused at validation (one row must not hold a job for hours)."
    )
    max_side: int = Field(
        4096, ge=1, description="Rows with a width or height above this are refused at validation."
    )

    @field_validator("allowed_uri_prefixes")
    @classmethod
    def _prefixes_are_checkable(cls, prefixes: list[str]) -> list[str]:
        for prefix in prefixes:
            if not prefix.strip():
                raise ValueError("an empty prefix would allow the current folder; name the folder")
            canonical(prefix)  # raises ValueError naming what is wrong with it
        return prefixes


class OutputConfig(_Strict):
    """Where and how results are written."""

    path: str = Field(..., description="Output prefix: PATH/data/ (images and metadata), PATH/errors/ (failed rows), "
                      "PATH/_RUN.json (fingerprint), PATH/_SUCCESS.json (summary, written last). Rerunning a job "
                      "into the same PATH resumes it.")
    image_format: Literal["png", "jpeg", "webp"] = Field("png", description="Encoding of the `image` column.")
    quality: int = Field(95, ge=1, le=100, description="JPEG/WebP quality (ignored for PNG).")
    png_compress_level: int = Field(
        6, ge=0, le=9, description="zlib level of PNG encoding, 0-9 (Pillow's default 6). Lower is faster and "
        "larger, with the same pixels: see README, Performance, for measured sizes and times.",
    )
    size_policy: Literal["crop", "round_up", "reject"] = Field(
        "crop",
        description="Sizes that are not multiples of 64: the model works at the next multiple of 64 "
        "(as diffusers does); 'crop' centre-crops back to the requested size, 'round_up' keeps the larger "
        "image, 'reject' refuses such rows at validation.",
    )
    format: Literal["parquet", "webdataset"] = Field(
        "parquet",
        description="Data shard format: 'parquet' (one table per unit; `image` is a Hugging Face Image column, "
        "struct{bytes, path}) or 'webdataset' (one tar per unit: `<key>.<image_format>` and `<key>.json` per "
        "row, the key derived from the id, see pipelines/shards.py). errors/ is Parquet either way.",
    )
    columns: list[Literal[SIGNAL_COLUMNS]] = Field(
        default_factory=list,
        description="Per-row signals to add, opt-in: 'image_embeds' (the prior's CLIP image embedding that "
        "conditioned the image, float32 list), 'clip_score' (cosine of the prompt's CLIP text embedding and "
        "the generated image's CLIP image embedding, both from the prior's encoders; runs a scoring stage, "
        "section `score`), 'sha256' (of the encoded image bytes), 'phash' (imagehash.phash of the image as "
        "stored, 16 hex digits). Part of the job's fingerprint.",
    )

    @field_validator("columns")
    @classmethod
    def _columns_once(cls, columns: list[str]) -> list[str]:
        twice = sorted({c for c in columns if columns.count(c) > 1})
        if twice:
            raise ValueError(f"output.columns names {twice} more than once")
        # Written (and fingerprinted) in one order, whatever order the YAML lists them in.
        return [c for c in SIGNAL_COLUMNS if c in columns]
    max_failed_fraction: float | None = Field(
        None,
        ge=0,
        le=1,
        description="A run that finishes with some rows in errors/ exits 0 (its job is done; rerunning retries "
        "those rows) unless more than this share of the rows in its scope failed, then it exits 1 (so a scheduler "
        "marks it failed). None: any share exits 0; 0: any failed row exits 1 (as `run --fail-on-row-errors`).",
    )
    lease_ttl_s: float = Field(
        120.0,
        gt=0,
        description="One run at a time per output: a run holds PATH/_LEASE.json and renews it every third of this "
        "time; a run that stops renewing (killed, machine lost) is taken over by the next one this long after its "
        "last renewal.",
    )


class JobConfig(_Strict):
    """A whole batch job."""

    input: InputConfig
    output: OutputConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    defaults: GenerationDefaults = Field(default_factory=GenerationDefaults)
    # On a GPU box give each stage num_gpus (fractions share one GPU) and larger batches.
    prior: StageConfig = Field(default_factory=StageConfig, description="Diffusion prior actors (Kandinsky 2.x).")
    text_encoder: StageConfig = Field(
        default_factory=StageConfig, description="Text encoder actors of families whose U-Net reads text (Kandinsky "
        "3's T5 encoder, its own pool: 8.7B parameters on the real model)."
    )
    encode: StageConfig = Field(
        default_factory=StageConfig, description="MoVQ encoder actors (init images; only when a row needs one)."
    )
    hint: StageConfig = Field(
        default_factory=StageConfig, description="ControlNet hint actors: depth estimation (only for ControlNet jobs)."
    )
    decoder: StageConfig = Field(default_factory=StageConfig, description="U-Net decoder actors.")
    movq: StageConfig = Field(default_factory=StageConfig, description="MoVQ decode + image encoding actors.")
    score: StageConfig = Field(
        default_factory=StageConfig, description="CLIP scoring actors (only when output.columns has clip_score)."
    )
    tasks: list[Literal[TASKS]] | None = Field(
        None,
        description="The tasks this job's rows run, filled in from the manifest by `kandinsky-batch run` (None: "
        "any). Stages keep only the models these tasks need: without mix or variation rows the prior frees the "
        "CLIP image encoder once it has computed the zero-image embedding.",
    )
    fuse_stages: bool = Field(
        False,
        description="Run every model stage in one actor pool, scheduled by the `decoder` section (actors, "
        "num_cpus, num_gpus, torch_threads); each stage keeps its batch size. For CPU machines and single "
        "GPUs: one process per replica loads every model once and hands no blocks between pools, so start-up "
        "and fill are shorter. Images are the same bytes as with a pool per stage at the same thread counts. "
        "See README, Benchmark.",
    )
    ray_address: str | None = Field(
        None, description="Ray cluster to attach to; default RAY_ADDRESS, else a local cluster is started."
    )
    storage_options: dict[str, dict] = Field(
        default_factory=dict,
        exclude=True,  # never in reports or _SUCCESS.json: may hold credentials
        repr=False,
        description="fsspec options per protocol, e.g. {s3: {endpoint_url: ..., key: ..., secret: ...}}; "
        "applied to the manifest, input files, the output and remote model directories. Standard env vars "
        "(AWS_*) work too.",
    )

    def rows_per_block(self) -> int:
        """Rows per unit of work (= per data shard): input.rows_per_block, else a few batches of the
        largest stage batch size."""
        if self.input.rows_per_block:
            return self.input.rows_per_block
        stages = (self.prior, self.text_encoder, self.hint, self.encode, self.decoder, self.movq)
        return 8 * max(stage.batch_size for stage in stages)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` strings to a nested dict, each value parsed against the type of the
    JobConfig field it sets (see `parse_value`). Every bad item is one line of the ConfigError raised."""
    problems = []
    for item in overrides:
        try:
            _apply_override(data, item)
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError(problems)
    return data


def _apply_override(data: dict, item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--set expects key.sub=value, got {item!r}")
    parts = key.split(".")
    value = parse_value(key, raw, _field_type(key, parts))
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {key}: {part!r} is not a section")
    node[parts[-1]] = value


def _field_type(key: str, parts: list[str]):
    """The type annotation of the JobConfig field at `parts` (Any below a free-form dict such as
    storage_options)."""
    annotation = JobConfig
    for depth, part in enumerate(parts):
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if part not in annotation.model_fields:
                raise ValueError(f"--set {key}: {unknown_key(part, annotation.model_fields, JobConfig)}")
            annotation = annotation.model_fields[part].annotation
        elif annotation is dict or get_origin(annotation) is dict:
            annotation = (get_args(annotation) or (str, Any))[1]
        elif annotation is not Any:
            raise ValueError(f"--set {key}: {'.'.join(parts[:depth])} is a value, not a section")
    return annotation


def _members(annotation) -> tuple:
    """The types of a union (`int | None` -> (int, NoneType)), or the type itself."""
    return get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)


def _admits_str(annotation) -> bool:
    return any(t is str or (get_origin(t) is Literal and any(isinstance(v, str) for v in get_args(t)))
               for t in _members(annotation))


def _is_collection(annotation) -> bool:
    return any((get_origin(t) or t) in (dict, list) or (isinstance(t, type) and issubclass(t, BaseModel))
               for t in _members(annotation))


# What each scalar type accepts on the command line (JSON scalars), for the check and its message.
_SCALARS = {bool: ("true or false", lambda v: isinstance(v, bool)),
            int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
            float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
            type(None): ("null", lambda v: v is None)}


def _json_scalar(raw: str):
    def refuse(name):  # NaN and Infinity: Python's json accepts them, JSON does not
        raise ValueError(name)

    return json.loads(raw, parse_constant=refuse)


def parse_value(key: str, raw: str, annotation):
    """A `--set` value, parsed against its field's type instead of by YAML 1.1's guesses (which make
    `no` a boolean and `2024-01-01` a date):
    - a field whose type admits a string gets `raw` exactly (`defaults.negative_prompt=no` is "no");
    - a dict, list or section gets YAML flow syntax (`storage_options={s3: {anon: true}}`, `[a, b]`);
    - a bool, int or float field gets a JSON scalar of its type (true/false only for a bool, never
      yes/no/on/off; null where the field is optional);
    - a key inside a free-form dict (`storage_options.s3.anon`) gets a JSON scalar if `raw` is one,
      else the string.
    """
    if annotation is Any:
        if raw.lstrip()[:1] in ("{", "["):
            return yaml.safe_load(raw)
        try:
            return _json_scalar(raw)
        except ValueError:
            return raw
    if _admits_str(annotation):
        return raw
    if _is_collection(annotation):
        value = yaml.safe_load(raw)
        if not isinstance(value, (dict, list)):
            raise ValueError(f"--set {key}={raw}: expected YAML flow syntax, e.g. [a, b] or {{a: 1}}")
        return value
    accepted = [_SCALARS[t] for t in _members(annotation) if t in _SCALARS]
    if not accepted:  # a type without a command-line form here: pydantic says what it takes
        return raw
    try:
        value = _json_scalar(raw)
    except ValueError:
        value = ...  # matches nothing below
    if not any(fits(value) for _, fits in accepted):
        raise ValueError(f"--set {key}={raw}: expected {' or '.join(name for name, _ in accepted)}")
    return value


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> JobConfig:
    """Read YAML, apply overrides, validate. Relative local paths resolve against the YAML's folder."""
    path = Path(path)
    cfg = validate(apply_overrides(read_yaml(path), list(overrides)), str(path), overrides)
    return resolve_paths(cfg, path.resolve().parent)


def validate(data: dict, where: str, overrides=()) -> JobConfig:
    """A JobConfig from `data`; pydantic's errors become one line per key (config_errors)."""
    try:
        return JobConfig.model_validate(data)
    except ValidationError as exc:  # one line per key, not pydantic's dump
        raise from_validation(exc, JobConfig, where, {o.partition("=")[0] for o in overrides}) from None


def resolve_paths(cfg: JobConfig, base: Path) -> JobConfig:
    """`cfg` with its relative local paths (manifest, allowed prefixes, output, model folders)
    taken from `base` (a config file's folder; the current folder for configs given in code)."""
    cfg.input.manifest = resolve_local(cfg.input.manifest, base)
    cfg.input.allowed_uri_prefixes = [resolve_local(p, base) for p in cfg.input.allowed_uri_prefixes]
    cfg.output.path = resolve_local(cfg.output.path, base)
    for field in ("prior", "decoder"):
        value = getattr(cfg.model, field)
        if value.startswith((".", "/")):
            setattr(cfg.model, field, resolve_local(value, base))
    return cfg


def resolve_local(value: str, base: Path) -> str:
    if "://" in value or Path(value).is_absolute():
        return value
    return str((base / value).resolve())
