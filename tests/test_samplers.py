"""A1111 sampler names on diffusers schedulers: every name runs on the tiny SD1 and SDXL models,
is deterministic for a seed, and leaves the model's own scheduler in place; names, legacy
"<sampler> <schedule>" forms and mistakes give the right sampler or a one-line error."""

from __future__ import annotations

import numpy as np
import pytest
from helpers_embeddings import tiny_pipeline

from tinv_lib.generation.samplers import (
    SamplerError,
    exact_lms_class,
    lms_coefficient,
    make_scheduler,
    sampler_names,
    scheduler_options,
    split_sampler_name,
)
from tinv_lib.generation.txt2img import generate

ISSUE_SAMPLERS = ["Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ SDE",
                  "DPM++ 2S a", "DDIM", "UniPC"]
STOCHASTIC = ["Euler a", "DPM2 a", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE", "LCM"]

pytestmark = pytest.mark.usefixtures("one_thread")


def image(pipe, sampler: str, seed: int = 1, steps: int = 2) -> np.ndarray:
    result = generate(pipe, "a red cat", seed=seed, steps=steps, width=64, height=64, sampler=sampler)
    return np.asarray(result.images[0])


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_every_sampler_runs_and_the_model_scheduler_stays(arch):
    pipe = tiny_pipeline(arch)
    own = pipe.scheduler
    names = sampler_names() + [name for name in ISSUE_SAMPLERS if name not in sampler_names()]
    assert set(ISSUE_SAMPLERS) <= set(names)
    distinct = {}
    for name in names:
        pixels = image(pipe, name, steps=6)  # enough steps for the higher-order solvers to differ
        assert pixels.shape == (64, 64, 3), name
        assert pixels.std() > 0, name  # a picture, not a blank or a NaN-turned-black frame
        assert pipe.scheduler is own, name
        distinct.setdefault(pixels.tobytes(), []).append(name)
    # Each name really selects its own sampler: only A1111's aliases (DPM++ 2M is DPM++ 2M
    # Karras under the Automatic schedule) may draw the same picture.
    shared = [group for group in distinct.values() if len(group) > 1]
    assert shared == [["DPM++ 2M", "DPM++ 2M Karras"]], shared


def test_stochastic_samplers_are_deterministic_for_a_seed():
    pipe = tiny_pipeline("sd1")
    for name in STOCHASTIC:
        first = image(pipe, name, seed=4)
        assert np.array_equal(first, image(pipe, name, seed=4)), name
        assert not np.array_equal(first, image(pipe, name, seed=5)), name


def test_schedule_types_change_the_sigmas():
    pipe = tiny_pipeline("sd1")
    plain = image(pipe, "DPM++ 2M Uniform")
    assert np.array_equal(image(pipe, "DPM++ 2M"), image(pipe, "DPM++ 2M Karras"))  # Automatic = Karras (A1111)
    assert not np.array_equal(plain, image(pipe, "DPM++ 2M Karras"))


def test_legacy_names_aliases_and_case():
    assert split_sampler_name("DPM++ 2M Karras") == ("DPM++ 2M", "Karras")
    assert split_sampler_name("DPM++ 2M SDE Exponential") == ("DPM++ 2M SDE", "Exponential")
    assert split_sampler_name("DPM++ 2M SDE Heun") == ("DPM++ 2M SDE Heun", "Automatic")
    assert split_sampler_name("DPM2 a Karras") == ("DPM2 a", "Karras")
    assert split_sampler_name("k_euler_a") == ("Euler a", "Automatic")
    assert split_sampler_name("euler A", "karras") == ("Euler a", "Karras")
    assert split_sampler_name("DPM++ 2M Karras", "Karras") == ("DPM++ 2M", "Karras")
    assert split_sampler_name("Euler", "SGMUniform") == ("Euler", "SGM Uniform")


@pytest.mark.parametrize(
    ("sampler", "schedule", "message"),
    [
        ("Eulr", "Automatic", "unknown sampler 'Eulr'; choose one of: DPM++ 2M, "),
        ("DPM adaptive", "Automatic", "no diffusers equivalent"),
        ("Euler", "Wobbly", "unknown schedule type 'Wobbly'; choose one of: Automatic, "),
        ("Euler", "Align Your Steps", "no diffusers equivalent"),
        ("Euler a", "Karras", "not available with sampler Euler a"),
        ("DPM++ 2M Karras", "Exponential", "names schedule type Karras"),
    ],
)
def test_mistakes_are_one_line_errors(sampler, schedule, message):
    with pytest.raises(SamplerError) as caught:
        scheduler_options(sampler, schedule)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    if "choose one of" in message and "sampler" in message:
        assert all(name in str(caught.value) for name in sampler_names())


def test_scheduler_keeps_the_models_config():
    """Betas and prediction type come from the model (here SD2 v-prediction), options from the sampler."""
    base = tiny_pipeline("sd2-v").scheduler.config
    scheduler = make_scheduler(base, "DPM++ 2M Karras")
    assert type(scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.beta_schedule == base.beta_schedule and scheduler.config.use_karras_sigmas
    assert make_scheduler(base, "Euler", "SGM Uniform").config.timestep_spacing == "trailing"


def test_lms_coefficients_are_the_exact_integrals():
    """The closed form equals a fine numerical integral of the same Lagrange polynomial."""
    sigmas = [14.6, 9.7, 5.2, 2.9, 1.1, 0.3, 0.0]
    for order in (1, 2, 3, 4):
        t = order + 1
        for current in range(order):
            taus = np.linspace(sigmas[t], sigmas[t + 1], 20001)
            basis = np.ones_like(taus)
            for k in range(order):
                if k != current:
                    basis *= (taus - sigmas[t - k]) / (sigmas[t - current] - sigmas[t - k])
            numeric = float(np.sum((basis[1:] + basis[:-1]) / 2 * np.diff(taus)))
            assert lms_coefficient(sigmas, order, t, current) == pytest.approx(numeric, rel=1e-7, abs=1e-9)
    assert exact_lms_class().__name__ == "ExactLMSDiscreteScheduler"
