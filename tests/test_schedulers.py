"""Schedulers vs diffusers: timestep lists, step-by-step parity on the same model outputs, the training
side (add_noise, Min-SNR weights), and config errors that name the key."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mg5jax.diffusion import schedulers

# diffusers computes sigmas with np.array(torch tensor), which numpy 2 flags as deprecated
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# SD 2.1-base's scheduler_config.json (PNDM), as stored on the hub; the other classes read it via from_config
SD21 = dict(_class_name="PNDMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
            prediction_type="epsilon", trained_betas=None, timestep_spacing="leading")  # fmt: skip

DIFFUSERS = {"pndm": "PNDMScheduler", "ddim": "DDIMScheduler", "dpm++2m": "DPMSolverMultistepScheduler",
             "euler": "EulerDiscreteScheduler"}  # fmt: skip
VARIANTS = {
    "sd21": {},
    "trailing": dict(timestep_spacing="trailing"),
    "linspace": dict(timestep_spacing="linspace"),
    "v_prediction": dict(prediction_type="v_prediction"),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
}
SHAPE = (2, 4, 8, 8)


def _reference(name, config, steps):
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    ref = getattr(diffusers, DIFFUSERS[name]).from_config(config)
    ref.set_timesteps(steps)
    return ref


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("name", sorted(DIFFUSERS))
def test_step_parity_with_diffusers(name, variant):
    import torch

    config = dict(SD21, **VARIANTS[variant])
    ours = schedulers.make_scheduler(name, config)
    step, scale = jax.jit(ours.step), jax.jit(ours.scale_model_input)
    for steps in (10, 50):
        ref = _reference(name, config, steps)
        state = ours.set_timesteps(steps, SHAPE)
        np.testing.assert_array_equal(ours.timesteps(state), ref.timesteps.numpy())
        np.testing.assert_allclose(float(state.init_noise_sigma), float(ref.init_noise_sigma), rtol=1e-6)
        rng = np.random.default_rng(steps)
        noise = rng.standard_normal(SHAPE).astype(np.float32)
        # a denoiser that predicts (roughly) the initial noise keeps samples O(1), as in real sampling
        outputs = [(noise + 0.1 * rng.standard_normal(SHAPE)).astype(np.float32) for _ in ref.timesteps]
        x_ref = torch.from_numpy(noise) * ref.init_noise_sigma
        x_free = jnp.asarray(noise) * state.init_noise_sigma
        state_free = state
        step_err = free_err = 0.0
        for i, t in enumerate(ref.timesteps):
            idx = jnp.int32(i)
            scaled = ref.scale_model_input(x_ref, t)
            ours_scaled = scale(state, jnp.asarray(x_ref.numpy()), idx)
            step_err = max(step_err, np.abs(np.asarray(ours_scaled) - scaled.numpy()).max())
            # step-by-step: the same sample and model output into both
            state, x_ours = step(state, jnp.asarray(outputs[i]), idx, jnp.asarray(x_ref.numpy()))
            # free-running: our own trajectory
            state_free, x_free = step(state_free, jnp.asarray(outputs[i]), idx, x_free)
            x_ref = ref.step(torch.from_numpy(outputs[i]), t, x_ref).prev_sample
            chex.assert_shape(x_ours, SHAPE)
            step_err = max(step_err, np.abs(np.asarray(x_ours) - x_ref.numpy()).max())
            free_err = max(free_err, np.abs(np.asarray(x_free) - x_ref.numpy()).max())
        print(f"{name} {variant} {steps} steps: step max-abs {step_err:.1e}, trajectory max-abs {free_err:.1e}")
        assert step_err <= 1e-5
        assert free_err <= 5e-5


def test_plms_timesteps_repeat_the_first_step():
    pndm = schedulers.make_scheduler("pndm", SD21)
    ts = pndm.timesteps(pndm.set_timesteps(50, SHAPE))
    assert len(ts) == 51 and list(ts[:4]) == [981, 961, 961, 941] and ts[-1] == 1


def test_step_counts_the_integer_timesteps_cannot_space_are_refused():
    """PNDM at more steps than trained timesteps would put every step at t=1 (diffusers does so silently)."""
    for name in ("pndm", "ddim", "dpm++2m"):
        with pytest.raises(ValueError, match="num_inference_steps=1001: expected 1 to the scheduler's "
                                             "num_train_timesteps=1000"):
            schedulers.make_scheduler(name, SD21).set_timesteps(1001, SHAPE)
        with pytest.raises(ValueError, match="num_inference_steps=0"):
            schedulers.make_scheduler(name, SD21).set_timesteps(0, SHAPE)
    euler = schedulers.make_scheduler("euler", SD21)  # fractional timesteps: any count, as in diffusers
    assert len(euler.timesteps(euler.set_timesteps(1500, SHAPE))) == 1500


def test_training_side_matches_formulas_and_diffusers():
    import torch
    from diffusers import DDPMScheduler

    schedule = schedulers.NoiseSchedule.from_config(SD21)
    ac = schedule.alphas_cumprod
    ref = DDPMScheduler.from_config(SD21).alphas_cumprod.numpy()
    np.testing.assert_allclose(ac, ref, rtol=1e-6)
    assert abs(ac[0] - 0.99915) < 1e-5 and abs(ac[999] - 0.00466) < 1e-5
    rng = np.random.default_rng(0)
    x0, noise = (rng.standard_normal((3, 4, 8, 8)).astype(np.float32) for _ in range(2))
    t = np.array([0, 500, 999])
    a = ac[t][:, None, None, None].astype(np.float64)
    noisy = np.asarray(schedulers.add_noise(jnp.asarray(ac), jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)))
    np.testing.assert_allclose(noisy, np.sqrt(a) * x0 + np.sqrt(1 - a) * noise, atol=1e-6)
    ddpm = DDPMScheduler.from_config(SD21)
    torch_noisy = ddpm.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(noisy, torch_noisy, atol=1e-6)

    w = np.asarray(schedulers.min_snr_weights(jnp.asarray(ac), jnp.arange(1000), gamma=5.0))
    snr = ac.astype(np.float64) / (1 - ac)
    np.testing.assert_allclose(w, np.minimum(snr, 5) / snr, rtol=1e-5)
    assert abs(w[0] - 0.0043) < 1e-4 and abs(w[100] - 0.59) < 5e-3
    assert (w[147:] == 1.0).all() and w[146] < 1.0


@pytest.mark.parametrize(
    "name, override, key",
    [
        ("pndm", dict(skip_prk_steps=False), "skip_prk_steps"),
        ("pndm", dict(beta_schedule="sigmoid"), "beta_schedule"),
        ("ddim", dict(prediction_type="flow_prediction"), "prediction_type"),
        ("ddim", dict(thresholding=True), "thresholding"),
        ("dpm++2m", dict(algorithm_type="sde-dpmsolver++"), "algorithm_type"),
        ("dpm++2m", dict(solver_order=3), "solver_order"),
        ("dpm++2m", dict(use_karras_sigmas=True), "use_karras_sigmas"),
        ("euler", dict(timestep_spacing="karras"), "timestep_spacing"),
        ("euler", dict(interpolation_type="log_linear"), "interpolation_type"),
    ],
)
def test_unsupported_config_values_name_the_key(name, override, key):
    with pytest.raises(ValueError, match=rf"unsupported {key}="):
        schedulers.make_scheduler(name, dict(SD21, **override))


def test_scheduler_registry_and_hashability():
    with pytest.raises(ValueError, match="unknown scheduler 'heun'"):
        schedulers.make_scheduler("heun", SD21)
    a = schedulers.make_scheduler("DPMSolverMultistepScheduler", SD21)
    b = schedulers.make_scheduler("dpm++2m", dict(SD21))
    assert a == b and hash(a) == hash(b)
    assert a != schedulers.make_scheduler("dpm++2m", dict(SD21, solver_type="heun"))
