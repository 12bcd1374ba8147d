"""The input and output sections and the whole job (`JobConfig`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PrivateAttr, field_validator

from ..limits import DEFAULT_MAX_INPUT_BYTES, DEFAULT_MAX_PIXELS, DEFAULT_READ_TIMEOUT_S
from ..uri_policy import canonical
from .sections import (SIGNAL_COLUMNS, TASKS, GenerationDefaults, ModelConfig, StageConfig, _Strict)



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
        "larger, with the same pixels: see docs/performance.md, for measured sizes and times.",
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

    # The config as written, where the engine chose the layout (pipelines/auto_layout.py): what _RUN.json
    # records and `verify` recomputes the fingerprint from (the layout is resolved again on each cluster).
    _as_written: "JobConfig | None" = PrivateAttr(default=None)

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
        "See docs/performance.md, Benchmark.",
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
