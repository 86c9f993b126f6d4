"""A1111 sampler and schedule-type names, mapped onto diffusers schedulers.

A1111 users name a sampler ("Euler a", "DPM++ 2M") and, since v1.9, a separate *schedule type*
("Karras", "Exponential", "Automatic"). Older versions wrote both in one name ("DPM++ 2M
Karras"); A1111 still accepts those by splitting off a trailing schedule name, and so do we.
"Automatic" means the sampler's preferred schedule where A1111 gives it one (DPM++ 2M, DPM++ SDE
and DPM++ 2S a prefer Karras; the DPM++ SDE multistep family prefers Exponential), otherwise the
model's own scheduler configuration.

Each sampler becomes a diffusers scheduler built from the model's scheduler config (so betas,
prediction type and offsets come from the model, never from constants here) with the options
that give that algorithm. The mapping follows the diffusers documentation's A1111 table. Two
A1111 samplers have no exact diffusers counterpart and use the nearest one: "DPM++ SDE" (the
exact port needs `torchsde`, not a dependency here) is the second-order single-step SDE
DPM-Solver++, and "DPM++ 2S a" is the second-order single-step DPM-Solver++. A1111 samplers
with no diffusers counterpart at all are refused by name.

"LMS" uses diffusers' LMS scheduler with its coefficients integrated exactly (they are integrals
of polynomials) instead of through scipy, which is not a dependency either.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tinv_lib.common.errors import TinvError

AUTOMATIC = "Automatic"


class SamplerError(TinvError):
    """An unknown or unsupported sampler or schedule type."""


@dataclass(frozen=True)
class Sampler:
    """One A1111 sampler: its diffusers scheduler class and the options that make it that algorithm."""

    name: str
    scheduler_class: str
    options: Mapping[str, Any] = field(default_factory=dict)
    preferred_schedule: str | None = None
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class ScheduleType:
    """One A1111 schedule type: the scheduler options that give it, and the option it needs."""

    label: str
    options: Mapping[str, Any]
    requires: str | None = None
    aliases: tuple[str, ...] = ()


_PLAIN_SIGMAS = {"use_karras_sigmas": False, "use_exponential_sigmas": False}

SAMPLERS: tuple[Sampler, ...] = (
    Sampler("DPM++ 2M", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2},
            "Karras", ("k_dpmpp_2m",)),
    Sampler("DPM++ SDE", "DPMSolverSinglestepScheduler",
            {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "lower_order_final": True}, "Karras", ("k_dpmpp_sde",)),
    Sampler("DPM++ 2M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
            "Exponential", ("k_dpmpp_2m_sde",)),
    Sampler("DPM++ 2M SDE Heun", "DPMSolverMultistepScheduler",
            {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "solver_type": "heun"}, "Exponential"),
    Sampler("DPM++ 2S a", "DPMSolverSinglestepScheduler",
            {"algorithm_type": "dpmsolver++", "solver_order": 2, "lower_order_final": True}, "Karras", ("k_dpmpp_2s_a",)),
    Sampler("DPM++ 3M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
            "Exponential", ("k_dpmpp_3m_sde",)),
    Sampler("Euler a", "EulerAncestralDiscreteScheduler", aliases=("k_euler_a", "k_euler_ancestral")),
    Sampler("Euler", "EulerDiscreteScheduler", aliases=("k_euler",)),
    Sampler("LMS", "ExactLMSDiscreteScheduler", aliases=("k_lms",)),
    Sampler("Heun", "HeunDiscreteScheduler", aliases=("k_heun",)),
    Sampler("DPM2", "KDPM2DiscreteScheduler", aliases=("k_dpm_2",)),
    Sampler("DPM2 a", "KDPM2AncestralDiscreteScheduler", aliases=("k_dpm_2_a",)),
    Sampler("DDIM", "DDIMScheduler"),
    Sampler("PLMS", "PNDMScheduler", {"skip_prk_steps": True}),
    Sampler("UniPC", "UniPCMultistepScheduler"),
    Sampler("LCM", "LCMScheduler", aliases=("k_lcm",)),
)

UNSUPPORTED_SAMPLERS = ("DPM fast", "DPM adaptive", "Restart", "DDIM CFG++")
"""A1111 samplers without a diffusers counterpart: named in the error instead of "unknown"."""

SCHEDULE_TYPES: tuple[ScheduleType, ...] = (
    ScheduleType(AUTOMATIC, {}),
    ScheduleType("Uniform", {"timestep_spacing": "linspace", **_PLAIN_SIGMAS}, aliases=("uniform",)),
    ScheduleType("Karras", {"use_karras_sigmas": True, "use_exponential_sigmas": False}, "use_karras_sigmas",
                 ("karras",)),
    ScheduleType("Exponential", {"use_exponential_sigmas": True, "use_karras_sigmas": False},
                 "use_exponential_sigmas", ("exponential",)),
    ScheduleType("SGM Uniform", {"timestep_spacing": "trailing", **_PLAIN_SIGMAS}, "timestep_spacing",
                 ("SGMUniform", "sgm_uniform")),
    ScheduleType("Simple", {"timestep_spacing": "trailing", **_PLAIN_SIGMAS}, "timestep_spacing", ("simple",)),
    ScheduleType("Normal", {"timestep_spacing": "linspace", **_PLAIN_SIGMAS}, "timestep_spacing", ("normal",)),
    ScheduleType("DDIM", {"timestep_spacing": "leading", "steps_offset": 1, **_PLAIN_SIGMAS}, "timestep_spacing",
                 ("ddim",)),
)

UNSUPPORTED_SCHEDULES = ("Polyexponential", "KL Optimal", "Align Your Steps", "Beta")

DEFAULT_SAMPLER = "DPM++ 2M"
"""A1111's default in current versions (the first of its samplers; Automatic schedule = Karras)."""


FLOW_SAMPLER = "Euler"  # FLUX.1 and SD3 sample with their own FlowMatchEulerDiscreteScheduler


def check_flow_sampler(sampler_name: str, schedule_type: str = AUTOMATIC) -> None:
    """Flow-matching models (FLUX.1, SD3) have one sampler, their scheduler's Euler steps on the
    flow (shifted as the model was trained); A1111's other samplers and schedule types are
    written for DDPM noise levels and do not exist for them."""
    name, schedule = split_sampler_name(sampler_name, schedule_type)
    if name != FLOW_SAMPLER or schedule != AUTOMATIC:
        asked = name if schedule == AUTOMATIC else f"{name} {schedule}"
        raise SamplerError(f"sampler {asked!r} does not exist for flow-matching models (FLUX.1, SD3): use "
                           f"{FLOW_SAMPLER!r}, their own scheduler")


def sampler_names() -> list[str]:
    """The sampler names `--sampler` accepts (a schedule suffix may follow any of them)."""
    return [sampler.name for sampler in SAMPLERS]


def schedule_labels() -> list[str]:
    """The schedule types `--schedule_type` accepts."""
    return [schedule.label for schedule in SCHEDULE_TYPES]


def _find(name: str, items: tuple) -> Any:
    """Case-insensitive lookup by name, label or alias."""
    wanted = name.strip().lower()
    for item in items:
        names = (getattr(item, "name", None) or item.label, *item.aliases)
        if wanted in (n.lower() for n in names):
            return item
    return None


def find_sampler(name: str) -> Sampler:
    """The sampler called `name` (no schedule suffix), or a one-line error listing the valid ones."""
    sampler = _find(name, SAMPLERS)
    if sampler is not None:
        return sampler
    if name.strip().lower() in (n.lower() for n in UNSUPPORTED_SAMPLERS):
        raise SamplerError(f"sampler {name!r} is an A1111 sampler with no diffusers equivalent; "
                           f"choose one of: {', '.join(sampler_names())}")
    raise SamplerError(f"unknown sampler {name!r}; choose one of: {', '.join(sampler_names())} "
                       f"(optionally followed by a schedule type, e.g. \"DPM++ 2M Karras\")")


def find_schedule(label: str) -> ScheduleType:
    """The schedule type called `label`, or a one-line error listing the valid ones."""
    schedule = _find(label, SCHEDULE_TYPES)
    if schedule is not None:
        return schedule
    if label.strip().lower() in (n.lower() for n in UNSUPPORTED_SCHEDULES):
        raise SamplerError(f"schedule type {label!r} has no diffusers equivalent; choose one of: {', '.join(schedule_labels())}")
    raise SamplerError(f"unknown schedule type {label!r}; choose one of: {', '.join(schedule_labels())}")


def _split_suffix(text: str) -> tuple[str, ScheduleType | None]:
    """`"DPM++ 2M Karras"` → `("DPM++ 2M", Karras)`; a name without a schedule suffix → `(name, None)`."""
    lowered = text.lower()
    for candidate in SCHEDULE_TYPES[1:]:
        for suffix in (candidate.label, *candidate.aliases):
            if lowered.endswith(" " + suffix.lower()):
                return text[: -len(suffix) - 1].strip(), candidate
    return text, None


def split_sampler_name(name: str, schedule_type: str = AUTOMATIC) -> tuple[str, str]:
    """Canonical `(sampler, schedule type)` for what a user or an infotext gives.

    A name ending in a schedule type ("DPM++ 2M Karras", pre-v1.9 A1111) is split as A1111
    does; that suffix wins over an "Automatic" `schedule_type`, and contradicting an explicit
    one is an error.
    """
    schedule = find_schedule(schedule_type or AUTOMATIC)
    text = name.strip()
    if _find(text, SAMPLERS) is None:
        text, suffix = _split_suffix(text)
        if suffix is not None:
            if schedule.label not in (AUTOMATIC, suffix.label):
                raise SamplerError(f"sampler {name!r} names schedule type {suffix.label} "
                                   f"but the schedule type given is {schedule.label}")
            schedule = suffix
    return find_sampler(text).name, schedule.label


def _scheduler_class(name: str) -> type:
    if name == "ExactLMSDiscreteScheduler":
        return exact_lms_class()
    import diffusers

    return getattr(diffusers, name)


def _init_parameters(cls: type) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self"}


def scheduler_options(sampler_name: str, schedule_type: str = AUTOMATIC) -> tuple[type, dict[str, Any]]:
    """The diffusers scheduler class and the config overrides for a sampler and schedule type.

    Raises a one-line `SamplerError` when the schedule type needs an option that the sampler's
    diffusers scheduler does not have (e.g. Karras sigmas with "Euler a").
    """
    sampler_name, label = split_sampler_name(sampler_name, schedule_type)
    sampler = find_sampler(sampler_name)
    cls = _scheduler_class(sampler.scheduler_class)
    accepted = _init_parameters(cls)
    if label == AUTOMATIC:
        schedule = find_schedule(sampler.preferred_schedule) if sampler.preferred_schedule else SCHEDULE_TYPES[0]
    else:
        schedule = find_schedule(label)
    if schedule.requires and schedule.requires not in accepted:
        usable = [s.label for s in SCHEDULE_TYPES if not s.requires or s.requires in accepted]
        raise SamplerError(f"schedule type {schedule.label} is not available with sampler {sampler.name} "
                           f"(diffusers {cls.__name__}); choose one of: {', '.join(usable)}")
    options = {key: value for key, value in schedule.options.items() if key in accepted}
    options.update(sampler.options)
    return cls, options


def make_scheduler(base_config: Mapping[str, Any], sampler_name: str, schedule_type: str = AUTOMATIC):
    """A new scheduler for `sampler_name` built from the model's scheduler config.

    Only the config keys the target class takes are passed on, so a model's PNDM or Euler
    config turns into any other scheduler without warnings about foreign keys.
    """
    cls, options = scheduler_options(sampler_name, schedule_type)
    accepted = _init_parameters(cls)
    config = {key: value for key, value in dict(base_config).items() if key in accepted}
    config.update(options)
    return cls.from_config(config)


_EXACT_LMS: type | None = None


def exact_lms_class() -> type:
    """`LMSDiscreteScheduler` with exact, scipy-free multistep coefficients (built on first use,
    so importing this module does not import diffusers)."""
    global _EXACT_LMS
    if _EXACT_LMS is None:
        # the class itself, not the placeholder `diffusers` exports when scipy is missing
        from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteScheduler

        class ExactLMSDiscreteScheduler(LMSDiscreteScheduler):
            """LMS whose coefficient (the integral of a Lagrange basis polynomial between two
            sigmas) is computed in closed form with numpy rather than by scipy quadrature."""

            def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
                return lms_coefficient([float(s) for s in self.sigmas], order, t, current_order)

        _EXACT_LMS = ExactLMSDiscreteScheduler
    return _EXACT_LMS


def lms_coefficient(sigmas: list[float], order: int, t: int, current_order: int) -> float:
    """∫ from sigmas[t] to sigmas[t+1] of the Lagrange basis polynomial that is 1 at
    sigmas[t - current_order] and 0 at the other nodes sigmas[t - k], k < order."""
    node = sigmas[t - current_order]
    basis = np.poly1d([1.0])
    for k in range(order):
        if k != current_order:
            basis = basis * np.poly1d([1.0, -sigmas[t - k]]) / (node - sigmas[t - k])
    antiderivative = basis.integ()
    return float(antiderivative(sigmas[t + 1]) - antiderivative(sigmas[t]))
