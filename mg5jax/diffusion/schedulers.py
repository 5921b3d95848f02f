"""Noise schedules (training) and samplers' schedulers (inference), exactly as diffusers defines them.

Training side: `NoiseSchedule` — betas and ᾱ (`alphas_cumprod`) of a config — and pure functions of
an ᾱ array: `add_noise`, `snr`, `min_snr_weights` (MiniGPT-5 trains ε-prediction only).

Sampling side: PNDM/PLMS (`skip_prk_steps`), DDIM (eta 0), DPM-Solver++ multistep and Euler. A
scheduler is a frozen, hashable description built from a diffusers `scheduler_config.json` (usable
as a static jit argument). `set_timesteps` runs on the host and returns a `flax.struct.dataclass`
state with the per-step tables and the solver's history, as numpy arrays (a jitted sampler takes them
as inputs; no device programs run to build them); `scale_model_input` and `step` are pure
functions of `(state, i, ...)` with the step index `i` a traced int, so a whole sampling loop is one
`lax.fori_loop`:

    state = sched.set_timesteps(50, latents.shape)
    x = latents * state.init_noise_sigma
    for i in range(len(sched.timesteps(state))):          # or lax.fori_loop
        eps = unet(sched.scale_model_input(state, x, i), state.timesteps[i], context)
        state, x = sched.step(state, eps, i, x)

Config keys follow diffusers' `from_config`: a key the class knows takes the config's value, a
missing one its class default, keys of other classes are ignored. Values we do not implement are
errors naming the key.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def _settings(config: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    return {k: config.get(k, v) for k, v in defaults.items()}


def _require(settings: Mapping[str, Any], key: str, allowed: Sequence[Any], where: str) -> None:
    if settings[key] not in allowed:
        raise ValueError(f"{where}: unsupported {key}={settings[key]!r}; supported: {list(allowed)}")


def _squaredcos_cap_v2_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return np.array([min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
                     for i in range(num_train_timesteps)], np.float32)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """The forward process q(x_t | x_0) of a diffusers scheduler config, plus what training needs."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"

    PREDICTION_TYPES: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction", "sample")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], where: str = "scheduler config",
                    prediction_types: Sequence[str] = PREDICTION_TYPES) -> NoiseSchedule:
        s = _settings(config, {f.name: f.default for f in dataclasses.fields(cls)})
        if s["trained_betas"] is None:
            _require(s, "beta_schedule", BETA_SCHEDULES, where)
        else:
            s["trained_betas"] = tuple(float(b) for b in s["trained_betas"])
            if len(s["trained_betas"]) != s["num_train_timesteps"]:
                raise ValueError(f"{where}: trained_betas has {len(s['trained_betas'])} values, "
                                 f"num_train_timesteps={s['num_train_timesteps']}")
        _require(s, "prediction_type", prediction_types, where)
        return cls(**s)

    @functools.cached_property
    def betas(self) -> np.ndarray:
        """`[T]` float32, as diffusers builds them."""
        t = self.num_train_timesteps
        if self.trained_betas is not None:
            return np.asarray(self.trained_betas, np.float32)
        if self.beta_schedule == "linear":
            return np.linspace(self.beta_start, self.beta_end, t, dtype=np.float32)
        if self.beta_schedule == "scaled_linear":
            return np.linspace(self.beta_start**0.5, self.beta_end**0.5, t, dtype=np.float32) ** 2
        return _squaredcos_cap_v2_betas(t)

    @functools.cached_property
    def alphas_cumprod(self) -> np.ndarray:
        """ᾱ_t `[T]` float32 (accumulated in float64, as torch's CPU cumprod does)."""
        return np.cumprod((1.0 - self.betas).astype(np.float64)).astype(np.float32)


def _alpha_bar(alphas_cumprod: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
    a = alphas_cumprod.astype(jnp.float32)[jnp.asarray(t)].reshape(-1)
    return a.reshape(a.shape + (1,) * (ndim - 1))


def add_noise(alphas_cumprod: jax.Array, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = √ᾱ_t·x0 + √(1-ᾱ_t)·noise; ᾱ `[T]`, x0/noise `[B, ...]`, integer t `[B]` (fp32 math, x0's
    dtype)."""
    a = _alpha_bar(alphas_cumprod, t, x0.ndim)
    return (jnp.sqrt(a) * x0.astype(jnp.float32) + jnp.sqrt(1 - a) * noise.astype(jnp.float32)).astype(x0.dtype)


def snr(alphas_cumprod: jax.Array, t: jax.Array) -> jax.Array:
    """SNR_t = ᾱ_t / (1 - ᾱ_t), `[B]`."""
    a = _alpha_bar(alphas_cumprod, t, 1)
    return a / (1 - a)


def min_snr_weights(alphas_cumprod: jax.Array, t: jax.Array, gamma: float = 5.0) -> jax.Array:
    """Min-SNR-γ weights of the ε-prediction loss `[B]`: min(SNR_t, γ) / SNR_t."""
    s = snr(alphas_cumprod, t)
    return jnp.minimum(s, gamma) / s


def _check_steps(num_inference_steps: int, num_train_timesteps: int, *, fractional: bool = False) -> tuple[int, int]:
    """`(n, t)`, refusing step counts the schedule cannot space on its integer timesteps (with more steps
    than trained timesteps PNDM puts every step at t=1 and denoises nothing, silently); `fractional`
    timesteps (interpolated sigmas) take any count from 1."""
    n, t = int(num_inference_steps), int(num_train_timesteps)
    if n < 1 or (n > t and not fractional):
        raise ValueError(f"num_inference_steps={n}: expected 1 to the scheduler's num_train_timesteps={t}"
                         if not fractional else f"num_inference_steps={n}: expected at least 1")
    return n, t


def _spaced(spacing: str, num_steps: int, num_train: int, steps_offset: int) -> np.ndarray:
    """Descending timesteps for `leading` / `trailing` / `linspace` spacing (DDIM / Euler rules, float64)."""
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, num_steps).round()[::-1].copy()
    if spacing == "leading":
        ratio = num_train // num_steps
        return (np.arange(0, num_steps) * ratio).round()[::-1] + steps_offset
    return np.round(np.arange(num_train, 0, -num_train / num_steps)) - 1


class _Scheduler:
    """Shared host-side helpers; subclasses are frozen dataclasses with `schedule` and their settings."""

    DEFAULTS: ClassVar[dict[str, Any]]
    PREDICTION_TYPES: ClassVar[tuple[str, ...]]
    schedule: NoiseSchedule

    @classmethod
    def _parse(cls, config: Mapping[str, Any], where: str) -> tuple[NoiseSchedule, dict[str, Any]]:
        schedule_defaults = {f.name: cls.DEFAULTS.get(f.name, f.default) for f in dataclasses.fields(NoiseSchedule)}
        schedule = NoiseSchedule.from_config(_settings(config, schedule_defaults), where, cls.PREDICTION_TYPES)
        s = _settings(config, cls.DEFAULTS)
        _require(s, "timestep_spacing", TIMESTEP_SPACINGS, where)
        for key in ("thresholding", "rescale_betas_zero_snr"):
            if key in s:
                _require(s, key, (False,), where)
        return schedule, s

    def timesteps(self, state) -> np.ndarray:
        """The timesteps the model is evaluated at, one per loop iteration (host copy)."""
        return np.asarray(state.timesteps)

    def scale_model_input(self, state, sample: jax.Array, i: jax.Array) -> jax.Array:
        """The denoiser's input at step i (the sample itself, unless the scheduler rescales it)."""
        return sample


# ------------------------------------------------------------------------------------------- PNDM / PLMS


@struct.dataclass
class PNDMState:
    """PLMS tables and history. `timesteps [N+1]`: the first step is evaluated twice in effect (the 2nd
    entry repeats the 3rd); `alpha_from/alpha_to [N+1]`: ᾱ at each step's start and end."""

    timesteps: jax.Array
    init_noise_sigma: jax.Array
    alpha_from: jax.Array
    alpha_to: jax.Array
    ets: jax.Array  # [4, *shape] last model outputs, newest last
    cur_sample: jax.Array  # the sample of step 0, which step 1 restarts from


# (weight of the current output, weights of ets[-1..-4]) / denominator, per case:
# step 1 (mean of the first two outputs), then linear multistep of order 1..4
_PLMS_COEFFS = np.array([[1, 1, 0, 0, 0, 2], [0, 1, 0, 0, 0, 1], [0, 3, -1, 0, 0, 2], [0, 23, -16, 5, 0, 12],
                         [0, 55, -59, 37, -9, 24]], np.float32)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class PNDMScheduler(_Scheduler):
    """diffusers `PNDMScheduler` with `skip_prk_steps=True` (pseudo linear multistep, SD's default)."""

    schedule: NoiseSchedule
    timestep_spacing: str
    steps_offset: int
    set_alpha_to_one: bool

    name: ClassVar[str] = "pndm"
    DEFAULTS: ClassVar[dict[str, Any]] = dict(
        beta_start=0.0001, beta_end=0.02, beta_schedule="linear", skip_prk_steps=False, set_alpha_to_one=False,
        prediction_type="epsilon", timestep_spacing="leading", steps_offset=0)  # fmt: skip
    PREDICTION_TYPES: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], where: str = "PNDM scheduler config") -> PNDMScheduler:
        schedule, s = cls._parse(config, where)
        _require(s, "skip_prk_steps", (True,), where)
        return cls(schedule, s["timestep_spacing"], int(s["steps_offset"]), bool(s["set_alpha_to_one"]))

    def plms_timesteps(self, num_inference_steps: int) -> np.ndarray:
        """diffusers' PLMS list: ascending base steps, the second-to-last repeated, then reversed."""
        n, t = _check_steps(num_inference_steps, self.schedule.num_train_timesteps)
        if self.timestep_spacing == "leading":
            base = (np.arange(0, n) * (t // n)).round() + self.steps_offset
        else:
            base = _spaced(self.timestep_spacing, n, t, 0)[::-1]
        base = base.astype(np.int64)
        return np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].copy()

    def set_timesteps(self, num_inference_steps: int, sample_shape: Sequence[int]) -> PNDMState:
        ts = self.plms_timesteps(num_inference_steps)
        ratio = self.schedule.num_train_timesteps // num_inference_steps
        start, end = ts.copy(), ts - ratio
        if len(ts) > 1:  # step 1 redoes step 0's interval with the averaged output
            start[1], end[1] = ts[1] + ratio, ts[1]
        ac = self.schedule.alphas_cumprod
        final = np.float32(1.0) if self.set_alpha_to_one else ac[0]
        return PNDMState(
            timesteps=ts.astype(np.int32), init_noise_sigma=np.float32(1.0),
            alpha_from=ac[start], alpha_to=np.where(end >= 0, ac[np.maximum(end, 0)], final).astype(np.float32),
            ets=np.zeros((4, *sample_shape), np.float32), cur_sample=np.zeros(sample_shape, np.float32),
        )  # fmt: skip

    def step(self, state: PNDMState, model_output: jax.Array, i: jax.Array, sample: jax.Array):
        """One PLMS step x_t -> x_{t-δ} (formula (9) of the PNDM paper); returns (state, prev_sample)."""
        mo, sample = model_output.astype(jnp.float32), sample.astype(jnp.float32)
        second = i == 1
        ets = jnp.where(second, state.ets, jnp.concatenate([state.ets[1:], mo[None]]))
        order = jnp.where(i <= 1, 1, jnp.minimum(i, 4))
        c = jnp.asarray(_PLMS_COEFFS)[jnp.where(second, 0, order)]
        combined = (c[0] * mo + c[1] * ets[3] + c[2] * ets[2] + c[3] * ets[1] + c[4] * ets[0]) / c[5]
        x = jnp.where(second, state.cur_sample, sample)
        a_t, a_prev = state.alpha_from[i], state.alpha_to[i]
        b_t, b_prev = 1 - a_t, 1 - a_prev
        if self.schedule.prediction_type == "v_prediction":
            combined = a_t**0.5 * combined + b_t**0.5 * x
        sample_coeff = (a_prev / a_t) ** 0.5
        denom = a_t * b_prev**0.5 + (a_t * b_t * a_prev) ** 0.5
        prev = sample_coeff * x - (a_prev - a_t) * combined / denom
        return state.replace(ets=ets, cur_sample=jnp.where(i == 0, sample, state.cur_sample)), prev


# ------------------------------------------------------------------------------------------- DDIM


@struct.dataclass
class DDIMState:
    """DDIM tables: `timesteps [N]`, ᾱ at each step's timestep and at the previous one."""

    timesteps: jax.Array
    init_noise_sigma: jax.Array
    alpha_t: jax.Array
    alpha_prev: jax.Array


@dataclasses.dataclass(frozen=True)
class DDIMScheduler(_Scheduler):
    """diffusers `DDIMScheduler`, deterministic (eta 0)."""

    schedule: NoiseSchedule
    timestep_spacing: str
    steps_offset: int
    set_alpha_to_one: bool
    clip_sample: bool
    clip_sample_range: float

    name: ClassVar[str] = "ddim"
    DEFAULTS: ClassVar[dict[str, Any]] = dict(
        beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=True, set_alpha_to_one=True,
        steps_offset=0, prediction_type="epsilon", thresholding=False, clip_sample_range=1.0,
        timestep_spacing="leading", rescale_betas_zero_snr=False)  # fmt: skip
    PREDICTION_TYPES: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction", "sample")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], where: str = "DDIM scheduler config") -> DDIMScheduler:
        schedule, s = cls._parse(config, where)
        return cls(schedule, s["timestep_spacing"], int(s["steps_offset"]), bool(s["set_alpha_to_one"]),
                   bool(s["clip_sample"]), float(s["clip_sample_range"]))

    def set_timesteps(self, num_inference_steps: int, sample_shape: Sequence[int]) -> DDIMState:
        n, t = _check_steps(num_inference_steps, self.schedule.num_train_timesteps)
        ts = _spaced(self.timestep_spacing, n, t, self.steps_offset).astype(np.int64)
        prev = ts - t // n
        ac = self.schedule.alphas_cumprod
        final = np.float32(1.0) if self.set_alpha_to_one else ac[0]
        alpha_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final)
        return DDIMState(timesteps=ts.astype(np.int32), init_noise_sigma=np.float32(1.0),
                         alpha_t=ac[ts], alpha_prev=alpha_prev.astype(np.float32))

    def step(self, state: DDIMState, model_output: jax.Array, i: jax.Array, sample: jax.Array):
        """x_t -> x_{t-δ} = √ᾱ_prev·x̂0 + √(1-ᾱ_prev)·ε̂; returns (state, prev_sample)."""
        mo, sample = model_output.astype(jnp.float32), sample.astype(jnp.float32)
        a_t, a_prev = state.alpha_t[i], state.alpha_prev[i]
        b_t = 1 - a_t
        kind = self.schedule.prediction_type
        if kind == "epsilon":
            x0, eps = (sample - b_t**0.5 * mo) / a_t**0.5, mo
        elif kind == "sample":
            x0 = mo
            eps = (sample - a_t**0.5 * x0) / b_t**0.5
        else:
            x0, eps = a_t**0.5 * sample - b_t**0.5 * mo, a_t**0.5 * mo + b_t**0.5 * sample
        if self.clip_sample:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        return state, a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps


# ------------------------------------------------------------------------------------------- DPM-Solver++


@struct.dataclass
class DPMSolverState:
    """DPM-Solver++ tables: `timesteps [N]`, `sigmas [N+1]` (σ = √((1-ᾱ)/ᾱ), then the final σ) and the
    previous step's data prediction x̂0."""

    timesteps: jax.Array
    init_noise_sigma: jax.Array
    sigmas: jax.Array
    prev_x0: jax.Array


def _alpha_sigma(sigma: jax.Array) -> tuple[jax.Array, jax.Array]:
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha, sigma * alpha


@dataclasses.dataclass(frozen=True)
class DPMSolverMultistepScheduler(_Scheduler):
    """diffusers `DPMSolverMultistepScheduler`, algorithm `dpmsolver++`, order 1 or 2 (2M)."""

    schedule: NoiseSchedule
    timestep_spacing: str
    steps_offset: int
    solver_order: int
    solver_type: str
    lower_order_final: bool
    euler_at_final: bool
    final_sigmas_type: str
    lambda_min_clipped: float

    name: ClassVar[str] = "dpm++2m"
    DEFAULTS: ClassVar[dict[str, Any]] = dict(
        beta_start=0.0001, beta_end=0.02, beta_schedule="linear", solver_order=2, prediction_type="epsilon",
        thresholding=False, algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
        euler_at_final=False, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
        use_lu_lambdas=False, use_flow_sigmas=False, final_sigmas_type="zero", lambda_min_clipped=-float("inf"),
        variance_type=None, timestep_spacing="linspace", steps_offset=0, rescale_betas_zero_snr=False,
        use_dynamic_shifting=False)  # fmt: skip
    PREDICTION_TYPES: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction", "sample")

    @classmethod
    def from_config(cls, config: Mapping[str, Any],
                    where: str = "DPMSolverMultistep scheduler config") -> DPMSolverMultistepScheduler:
        schedule, s = cls._parse(config, where)
        _require(s, "algorithm_type", ("dpmsolver++",), where)
        _require(s, "solver_order", (1, 2), where)
        _require(s, "solver_type", ("midpoint", "heun"), where)
        _require(s, "final_sigmas_type", ("zero", "sigma_min"), where)
        _require(s, "variance_type", (None,), where)
        for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                    "use_flow_sigmas", "use_dynamic_shifting"):
            _require(s, key, (False, None), where)
        return cls(schedule, s["timestep_spacing"], int(s["steps_offset"]), int(s["solver_order"]), s["solver_type"],
                   bool(s["lower_order_final"]), bool(s["euler_at_final"]), s["final_sigmas_type"],
                   float(s["lambda_min_clipped"]))  # fmt: skip

    def set_timesteps(self, num_inference_steps: int, sample_shape: Sequence[int]) -> DPMSolverState:
        n, t = _check_steps(num_inference_steps, self.schedule.num_train_timesteps)
        ac = self.schedule.alphas_cumprod
        lambdas = np.log(np.sqrt(ac)) - np.log(np.sqrt(1 - ac))
        last = t - int(np.searchsorted(lambdas[::-1], self.lambda_min_clipped))
        if self.timestep_spacing == "linspace":
            ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1]
        elif self.timestep_spacing == "leading":
            ts = (np.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1] + self.steps_offset
        else:
            ts = np.arange(last, 0, -t / n).round() - 1
        ts = ts.astype(np.int64)
        sigmas_all = ((1 - ac) / ac) ** 0.5
        sigmas = np.interp(ts, np.arange(len(sigmas_all)), sigmas_all)
        last_sigma = sigmas_all[0] if self.final_sigmas_type == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [last_sigma]]).astype(np.float32)
        return DPMSolverState(timesteps=ts.astype(np.int32), init_noise_sigma=np.float32(1.0),
                              sigmas=sigmas, prev_x0=np.zeros(sample_shape, np.float32))

    def _data_prediction(self, mo: jax.Array, sample: jax.Array, sigma: jax.Array) -> jax.Array:
        kind = self.schedule.prediction_type
        if kind == "sample":
            return mo
        alpha_t, sigma_t = _alpha_sigma(sigma)
        if kind == "epsilon":
            return (sample - sigma_t * mo) / alpha_t
        return alpha_t * sample - sigma_t * mo

    def step(self, state: DPMSolverState, model_output: jax.Array, i: jax.Array, sample: jax.Array):
        """One multistep DPM-Solver++ update (first order on the first step and, per diffusers' rules,
        the last); returns (state, prev_sample)."""
        n = state.sigmas.shape[0] - 1
        mo, sample = model_output.astype(jnp.float32), sample.astype(jnp.float32)
        x0 = self._data_prediction(mo, sample, state.sigmas[i])
        alpha_t, sigma_t = _alpha_sigma(state.sigmas[i + 1])
        alpha_s0, sigma_s0 = _alpha_sigma(state.sigmas[i])
        alpha_s1, sigma_s1 = _alpha_sigma(state.sigmas[jnp.maximum(i - 1, 0)])
        lambda_t = jnp.log(alpha_t) - jnp.log(sigma_t)
        lambda_s0 = jnp.log(alpha_s0) - jnp.log(sigma_s0)
        lambda_s1 = jnp.log(alpha_s1) - jnp.log(sigma_s1)
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        final_first_order = (self.euler_at_final or (self.lower_order_final and n < 15)
                             or self.final_sigmas_type == "zero")
        first = (i == 0) | (self.solver_order == 1) | ((i == n - 1) & final_first_order)
        c0 = alpha_t * (jnp.exp(-h) - 1.0)
        if self.solver_type == "midpoint":
            c1 = 0.5 * c0
        else:
            c1 = -(alpha_t * ((jnp.exp(-h) - 1.0) / h + 1.0))
        d1 = jnp.where(first, 0.0, 1.0 / (h_0 / h)) * (x0 - state.prev_x0)
        prev = (sigma_t / sigma_s0) * sample - c0 * x0 - jnp.where(first, 0.0, c1) * d1
        return state.replace(prev_x0=x0), prev


# ------------------------------------------------------------------------------------------- Euler


@struct.dataclass
class EulerState:
    """Euler tables: float `timesteps [N]`, `sigmas [N+1]` (ending at the final σ), the initial σ."""

    timesteps: jax.Array
    init_noise_sigma: jax.Array
    sigmas: jax.Array


@dataclasses.dataclass(frozen=True)
class EulerDiscreteScheduler(_Scheduler):
    """diffusers `EulerDiscreteScheduler` (no churn), with its `scale_model_input`."""

    schedule: NoiseSchedule
    timestep_spacing: str
    steps_offset: int
    final_sigmas_type: str

    name: ClassVar[str] = "euler"
    DEFAULTS: ClassVar[dict[str, Any]] = dict(
        beta_start=0.0001, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon",
        interpolation_type="linear", use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
        timestep_spacing="linspace", timestep_type="discrete", steps_offset=0, rescale_betas_zero_snr=False,
        final_sigmas_type="zero")  # fmt: skip
    PREDICTION_TYPES: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction", "sample")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], where: str = "Euler scheduler config") -> EulerDiscreteScheduler:
        schedule, s = cls._parse(config, where)
        _require(s, "interpolation_type", ("linear",), where)
        _require(s, "timestep_type", ("discrete",), where)
        _require(s, "final_sigmas_type", ("zero", "sigma_min"), where)
        for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
            _require(s, key, (False, None), where)
        return cls(schedule, s["timestep_spacing"], int(s["steps_offset"]), s["final_sigmas_type"])

    def set_timesteps(self, num_inference_steps: int, sample_shape: Sequence[int]) -> EulerState:
        # fractional timesteps (sigmas interpolated): any count is spaced, as in diffusers
        n, t = _check_steps(num_inference_steps, self.schedule.num_train_timesteps, fractional=True)
        if self.timestep_spacing == "linspace":
            ts = np.linspace(0, t - 1, n, dtype=np.float32)[::-1].copy()
        else:
            ts = _spaced(self.timestep_spacing, n, t, self.steps_offset).astype(np.float32)
        ac = self.schedule.alphas_cumprod
        sigmas_all = ((1 - ac) / ac) ** 0.5
        sigmas = np.interp(ts, np.arange(len(sigmas_all)), sigmas_all)
        last_sigma = sigmas_all[0] if self.final_sigmas_type == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [last_sigma]]).astype(np.float32)
        max_sigma = sigmas.max()
        init = max_sigma if self.timestep_spacing in ("linspace", "trailing") else (max_sigma**2 + 1) ** 0.5
        return EulerState(timesteps=ts.astype(np.float32), init_noise_sigma=np.float32(init), sigmas=sigmas)

    def scale_model_input(self, state: EulerState, sample: jax.Array, i: jax.Array) -> jax.Array:
        """x / √(σ_i² + 1), what the denoiser expects at step i."""
        return (sample / ((state.sigmas[i] ** 2 + 1) ** 0.5)).astype(sample.dtype)

    def step(self, state: EulerState, model_output: jax.Array, i: jax.Array, sample: jax.Array):
        """x_{i+1} = x_i + (x_i - x̂0)/σ_i · (σ_{i+1} - σ_i); returns (state, prev_sample)."""
        mo, sample = model_output.astype(jnp.float32), sample.astype(jnp.float32)
        sigma = state.sigmas[i]
        kind = self.schedule.prediction_type
        if kind == "sample":
            x0 = mo
        elif kind == "epsilon":
            x0 = sample - sigma * mo
        else:
            x0 = mo * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
        derivative = (sample - x0) / sigma
        return state, sample + derivative * (state.sigmas[i + 1] - sigma)


# ------------------------------------------------------------------------------------------- registry

SCHEDULERS: dict[str, type] = {
    "pndm": PNDMScheduler, "PNDMScheduler": PNDMScheduler,
    "ddim": DDIMScheduler, "DDIMScheduler": DDIMScheduler,
    "dpm++2m": DPMSolverMultistepScheduler, "dpmsolver++": DPMSolverMultistepScheduler,
    "DPMSolverMultistepScheduler": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler, "EulerDiscreteScheduler": EulerDiscreteScheduler,
}  # fmt: skip

Scheduler = PNDMScheduler | DDIMScheduler | DPMSolverMultistepScheduler | EulerDiscreteScheduler
SchedulerState = PNDMState | DDIMState | DPMSolverState | EulerState


def make_scheduler(name: str, config: Mapping[str, Any]) -> Scheduler:
    """A scheduler by name ('pndm', 'ddim', 'dpm++2m', 'euler', or the diffusers class name) from a
    diffusers `scheduler_config.json` dict (saved by any scheduler class, as diffusers' `from_config`)."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; known: {sorted(SCHEDULERS)}")
    cls = SCHEDULERS[name]
    return cls.from_config(config, where=f"{cls.__name__} config")
