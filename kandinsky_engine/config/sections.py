"""The model, stage and generation sections of a job config (one documented pydantic model each)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..sampling import SCHEDULERS

TINY = "tiny"
HUB_PRIOR = "kandinsky-community/kandinsky-2-2-prior"
HUB_DECODER = "kandinsky-community/kandinsky-2-2-decoder"
HUB_DEPTH = "Intel/dpt-hybrid-midas"
# Every task of every family; which ones a job's weights can run is the family's (kandinsky_engine/families/).
TASKS = ("text2img", "img2img", "mix", "variation", "inpaint", "controlnet", "controlnet_img2img")
# Opt-in per-row output columns (output.columns), in the order they are written.
SIGNAL_COLUMNS = ("image_embeds", "clip_score", "sha256", "phash")


# Default torch threads of an actor with a GPU share (StageConfig.threads): num_cpus 0.2 would give it one.
GPU_THREADS = 4


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
        "the family whose diffusers pipeline model.decoder's model_index.json names (`_class_name`). See docs/models.md.",
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
        "tensor-core GPUs). Changes float results within the batch-shape tolerance; see docs/performance.md.",
    )
    compile: bool = Field(
        False, description="torch.compile (inductor) the decoder U-Net of every family, the Kandinsky 2.x prior "
        "(with CUDA graphs on a GPU) and the MoVQ decode: one static graph per batch-size bucket (the stage's full "
        "call and half of it; guidance makes U-Net and prior calls even), compiled when an actor starts, cached "
        "per node under cache_dir/inductor. Calls are padded up to their bucket; a call no graph fits runs eagerly, "
        "logged and counted, so nothing recompiles during the job. Changes float results within the batch-shape "
        "tolerance; see docs/performance.md.",
    )
    fp8: bool = Field(
        False, description="Run the decoder U-Net's linear layers in float8 with dynamic scales (torchao; NVIDIA "
        "GPUs of compute capability 8.9 or newer: Ada, Hopper, Blackwell), and its convolutions where torchao has a "
        "float8 kernel for them (compute capability 10.0); off by default. Needs model.device cuda, model.dtype "
        "bfloat16 and the torchao package; refused elsewhere. Changes float results beyond the bfloat16 bound (the "
        "GPU benchmark measures its distance from bfloat16, docs/performance.md); part of the run fingerprint.",
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
        if self.fp8 and self.device.startswith("cpu"):
            raise ValueError(f"model.fp8 needs a cuda device (an NVIDIA GPU of compute capability 8.9 or newer), got "
                             f"model.device={self.device!r}")
        if self.fp8 and self.dtype not in ("bfloat16", "auto"):
            raise ValueError(f"model.fp8 quantizes bfloat16 weights: set model.dtype: bfloat16 (got {self.dtype})")
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
        description="torch intra-op threads per actor; default round(num_cpus), at least 1, and at least "
        f"{GPU_THREADS} for an actor with a GPU share (its CPU work: tokenizing, stacking inputs, drawing the next "
        "group's noise beside the thread that launches the GPU's kernels). Ray sets OMP_NUM_THREADS from num_cpus, "
        "so the engine sets this explicitly.",
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
        return self.torch_threads or max(GPU_THREADS if self.num_gpus > 0 else 1, round(self.num_cpus))


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
        "100. The prior always runs its UnCLIPScheduler (see docs/performance.md). Kandinsky 2.0 runs its "
        "original repository's samplers: 'ddpm' (p_sampler), 'ddim' (its default) or 'plms' (docs/kandinsky20.md).",
    )
    ddim_eta: float | None = Field(
        None, ge=0, description="Kandinsky 2.0's DDIM eta (the noise of each step; 0 is deterministic); None: the "
        "family's default, 0.05 as the original's generate_* functions (which ignore it and run 0). Unused by the "
        "other families, whose DDIM runs with eta 0 as their diffusers pipelines.",
    )
