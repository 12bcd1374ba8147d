"""Vectorised denoising that keeps every row exact: one batched guidance and scheduler step per group.

The per-row loop the engine ran before (kept in tests/per_row.py) stepped each row alone, with its
own scale and generator; on a GPU that meant one host->device copy and several host syncs per row
and step. Here a group of rows (same size, steps, task, start step) steps at once:

- each row's noise for the whole trajectory is drawn up front on the CPU from the row's own
  generator, draw by draw in the order the per-row loop made them (`draw_noise`; the decoders
  draw the next group's on a background thread, transfer.NoisePrefetch), and copied to the device
  once (pinned memory, non-blocking on CUDA);
- guidance uses a tensor of per-row scales (`guide`);
- the schedule lives on the CPU: the scheduler sees Python-int timesteps, the model a device tensor
  of them made once, and the coefficients of DDPM's and UnCLIP's steps are computed once per step
  by the schedulers' own formulas (`AncestralSteps`). No step reads a device value back.

Every operation is elementwise with scalars shared by the group, so on the CPU in float32 each row's
result is bit for bit the per-row loop's (tests/test_sampling.py). Nothing here imports Ray or
pydantic: jobs/bench_gpu.py runs the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

# defaults.scheduler -> diffusers class; each built with `from_config(<the decoder's scheduler config>)`,
# as a diffusers user swaps schedulers (`pipe.scheduler = X.from_config(pipe.scheduler.config)`).
SCHEDULERS = {
    "ddpm": "DDPMScheduler",  # the model's own: ancestral, draws noise at every step
    "ddim": "DDIMScheduler",  # eta = 0 (the pipelines pass none): deterministic
    "dpmpp": "DPMSolverMultistepScheduler",  # DPM-Solver++ (2M), multistep: deterministic
    "unipc": "UniPCMultistepScheduler",  # multistep predictor-corrector: deterministic
    "euler": "EulerDiscreteScheduler",  # s_churn = 0 (the pipelines pass none): deterministic
}
LEARNED = ("learned", "learned_range")  # variance types whose model output carries a predicted variance


def make_scheduler(kind: str, config):
    """A fresh scheduler of `kind` from a scheduler config: one per group and call, never shared,
    since multistep schedulers keep the previous steps' outputs."""
    import diffusers

    return getattr(diffusers, SCHEDULERS[kind]).from_config(config)


def draw_noise(generators, shapes, draws: int, dtype, device):
    """Row r's first `draws` standard-normal tensors of shape shapes[r] from generators[r], each
    drawn alone as `randn_tensor` draws it, so each row's stream is the per-row loop's
    -> (draws, sum of shapes' first dims, ...) on `device`, in one copy (pinned, non-blocking on CUDA).
    The decoders draw through transfer.NoisePrefetch instead, which does the same on a background thread."""
    import torch

    from .transfer import upload

    rows = [torch.stack([torch.randn(shape, generator=g, dtype=dtype) for _ in range(draws)])
            for g, shape in zip(generators, shapes)]
    return upload(torch.cat(rows, dim=1), device)  # (draws, M, ...)


def count_draws(scheduler, num_steps: int, t_start: int) -> int:
    """How many noise draws a row makes with this (fresh) scheduler: its initial noise, then one per
    step that draws (`Schedule.noise_steps`), computed on the CPU without building the schedule."""
    from diffusers import DDPMScheduler, UnCLIPScheduler

    scheduler.set_timesteps(num_steps, device="cpu")
    if not isinstance(scheduler, (DDPMScheduler, UnCLIPScheduler)):
        return 1
    return 1 + sum(int(t) > 0 for t in scheduler.timesteps[t_start:].tolist())


def row_scales(scales, ndim: int, device):
    """Per-row guidance scales as a float32 (n, 1, ...) tensor that broadcasts over an ndim-dim output."""
    import torch

    from .transfer import upload

    return upload(torch.tensor(scales, dtype=torch.float32).view(-1, *[1] * (ndim - 1)), device)


def guide(uncond, text, scales, dtype):
    """Classifier-free guidance, uncond + s * (text - uncond), with each row's own s.

    s is float32 while the outputs may be half: the product is then formed in float32 and rounded
    once, as a Python-float scale does it (the kernels keep such a scalar in float32), so the result
    is the per-row loop's in every dtype."""
    return uncond + (scales * (text - uncond)).to(dtype)


@dataclass
class Coefficients:
    """One step of x_prev = x0_coeff * x0 + sample_coeff * x_t + noise_scale * z (0-dim CPU float32)."""

    sqrt_alpha_prod: object
    sqrt_beta_prod: object
    x0_coeff: object
    sample_coeff: object
    noise_scale: object  # None: no noise at this step (t = 0), or one that depends on the model's variance


class AncestralSteps:
    """`DDPMScheduler.step` and `UnCLIPScheduler.step`, batched, with the noise given.

    Both schedulers draw their variance noise inside `step` from the generator they are passed and
    index their tables with the timestep; here the coefficients of every step are computed once,
    on the CPU, with the same 0-dim float32 operations as their `step` (so the same bits), and the
    noise comes from `draw_noise`. `step` then does only elementwise device work with CPU scalars.
    """

    def __init__(self, scheduler, timesteps: list[int], unclip: bool):
        self.scheduler, self.timesteps, self.unclip = scheduler, timesteps, unclip
        config = scheduler.config
        self.prediction_type, self.variance_type = config.prediction_type, config.variance_type
        if self.prediction_type not in ("epsilon", "sample") + (() if unclip else ("v_prediction",)):
            raise ValueError(f"{type(scheduler).__name__}: unknown prediction_type {self.prediction_type!r}")
        # UnCLIP: the caller passes the next timestep of the schedule; the last step goes to t - 1.
        self.prevs = timesteps[1:] + [None] if unclip else [scheduler.previous_timestep(t) for t in timesteps]
        self.coefficients = [self._unclip(t, p) if unclip else self._ddpm(t, p) for t, p in zip(timesteps, self.prevs)]

    def draws(self, k: int) -> bool:
        """Whether step k draws noise (both schedulers: t > 0)."""
        return self.timesteps[k] > 0

    def _ddpm(self, t: int, prev_t) -> Coefficients:
        s = self.scheduler
        alpha_prod_t = s.alphas_cumprod[t]
        alpha_prod_t_prev = s.alphas_cumprod[prev_t] if prev_t >= 0 else s.one
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t
        noise_scale = None
        if t > 0 and self.variance_type == "fixed_small_log":
            noise_scale = s._get_variance(t)
        elif t > 0 and self.variance_type not in LEARNED:
            noise_scale = s._get_variance(t) ** 0.5
        return Coefficients(alpha_prod_t ** 0.5, beta_prod_t ** 0.5,
                            (alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t,
                            current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t, noise_scale)

    def _unclip(self, t: int, prev: int | None) -> Coefficients:
        s = self.scheduler
        prev = t - 1 if prev is None else prev
        alpha_prod_t = s.alphas_cumprod[t]
        alpha_prod_t_prev = s.alphas_cumprod[prev] if prev >= 0 else s.one
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        if prev == t - 1:
            beta, alpha = s.betas[t], s.alphas[t]
        else:
            beta = 1 - alpha_prod_t / alpha_prod_t_prev
            alpha = 1 - beta
        noise_scale = None
        if t > 0 and self.variance_type == "fixed_small_log":
            noise_scale = s._get_variance(t, prev_timestep=prev)
        elif t > 0 and self.variance_type != "learned_range":
            raise ValueError(f"UnCLIPScheduler: unknown variance_type {self.variance_type!r}")
        return Coefficients(alpha_prod_t ** 0.5, beta_prod_t ** 0.5, (alpha_prod_t_prev ** (0.5) * beta) / beta_prod_t,
                            alpha ** (0.5) * beta_prod_t_prev / beta_prod_t, noise_scale)

    def _learned_scale(self, k: int, predicted_variance):
        """The noise scale of the learned variance types, per element of the model's variance output."""
        import torch

        s, t = self.scheduler, self.timesteps[k]
        if self.unclip:
            return (0.5 * s._get_variance(t, predicted_variance=predicted_variance, prev_timestep=self.prevs[k])).exp()
        if self.variance_type == "learned_range":
            return torch.exp(0.5 * s._get_variance(t, predicted_variance=predicted_variance))
        return predicted_variance ** 0.5

    def step(self, k: int, model_output, sample, noise):
        """x_t -> x_prev for the whole group. `noise`: this step's draws (None when t = 0)."""
        c, config = self.coefficients[k], self.scheduler.config
        predicted_variance = None
        if model_output.shape[1] == sample.shape[1] * 2 and self.variance_type in LEARNED:
            model_output, predicted_variance = model_output.split(sample.shape[1], dim=1)
        if self.prediction_type == "epsilon":
            x0 = (sample - c.sqrt_beta_prod * model_output) / c.sqrt_alpha_prod
        elif self.prediction_type == "sample":
            x0 = model_output
        else:  # v_prediction
            x0 = c.sqrt_alpha_prod * sample - c.sqrt_beta_prod * model_output
        if not self.unclip and config.thresholding:
            x0 = self.scheduler._threshold_sample(x0)  # per sample: each row's own quantile
        elif config.clip_sample:
            x0 = x0.clamp(-config.clip_sample_range, config.clip_sample_range)
        prev = c.x0_coeff * x0 + c.sample_coeff * sample
        if noise is not None:
            scale = c.noise_scale if c.noise_scale is not None else self._learned_scale(k, predicted_variance)
            prev = prev + scale * noise
        return prev


class Schedule:
    """The timesteps and step function of one group, on a fresh scheduler.

    `timesteps` are Python ints from `t_start` on (what the scheduler is stepped with);
    `model_timesteps` the same on the device (what the model gets: indexing it reads nothing back).
    DDPM and UnCLIP step through `AncestralSteps`; the other schedulers through their own `step`,
    which with a Python-int timestep and the schedule on the CPU computes its coefficients on the
    CPU too (UniPC still makes a small device tensor per step inside diffusers).
    """

    def __init__(self, scheduler, num_steps: int, t_start: int, device):
        import torch
        from diffusers import DDPMScheduler, UnCLIPScheduler

        from .transfer import upload

        scheduler.set_timesteps(num_steps, device="cpu")
        self.scheduler = scheduler
        self.timesteps = scheduler.timesteps[t_start:].tolist()
        self.model_timesteps = upload(torch.tensor(self.timesteps), device)  # pinned, non-blocking on CUDA
        self.ancestral = None
        if isinstance(scheduler, (DDPMScheduler, UnCLIPScheduler)):
            self.ancestral = AncestralSteps(scheduler, self.timesteps, unclip=isinstance(scheduler, UnCLIPScheduler))
        if hasattr(scheduler, "is_scale_input_called"):
            # Euler: diffusers' Kandinsky pipelines never call scale_model_input, and the engine runs
            # as they do (docs/performance.md); this only keeps diffusers from warning at every step.
            scheduler.is_scale_input_called = True

    @property
    def init_noise_sigma(self):
        return self.scheduler.init_noise_sigma

    def noise_steps(self) -> list[bool]:
        """Per step, whether it consumes one noise draw per row."""
        return [self.ancestral is not None and self.ancestral.draws(k) for k in range(len(self.timesteps))]

    def add_noise(self, original, noise):
        """Noise every row to the first timestep (img2img, emb2emb): the scheduler's own add_noise."""
        import torch

        return self.scheduler.add_noise(original, noise, torch.tensor(self.timesteps[:1]).repeat(len(original)))

    def blend_coefficients(self, dtype) -> list[tuple]:
        """(a, b) for each step but the last, such that scheduler.add_noise(x, z, t_{k+1}) equals
        a * x + b * z bit for bit. Read off the scheduler's own add_noise on CPU probes (a * 1 + b * 0
        is exactly a, a * 0 + b * 1 exactly b), so the inpainting blend needs no scheduler call in the loop."""
        import torch

        one, zero = torch.ones(1, dtype=dtype), torch.zeros(1, dtype=dtype)
        out = []
        for t in self.timesteps[1:]:
            t = torch.tensor([t])
            out.append((self.scheduler.add_noise(one, zero, t)[0], self.scheduler.add_noise(zero, one, t)[0]))
        return out

    def step(self, k: int, model_output, sample, noise=None):
        if self.ancestral is not None:
            return self.ancestral.step(k, model_output, sample, noise)
        return self.scheduler.step(model_output, self.timesteps[k], sample, return_dict=False)[0]
