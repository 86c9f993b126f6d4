"""A1111 learning-rate schedule strings, checked against the cases A1111's own code produced."""

import json
from pathlib import Path

import pytest

from tinv_lib.training.lr_schedule import INVALID_SCHEDULE, ScheduleError, ScheduleString, build_schedule

CASES = json.loads((Path(__file__).parent / "fixtures" / "a1111" / "schedules.json").read_text())["cases"]


@pytest.mark.parametrize("case", CASES, ids=[f"{c['learn_rate']!r}@{c['cur_step']}/{c['max_steps']}" for c in CASES])
def test_schedule_matches_a1111(case):
    if not case["ok"]:
        with pytest.raises(ScheduleError) as caught:
            ScheduleString(case["learn_rate"], case["max_steps"], case["cur_step"])
        assert str(caught.value).startswith(case["exception"]["message"])
        return
    schedule = ScheduleString(case["learn_rate"], case["max_steps"], case["cur_step"])
    assert [list(p) for p in schedule.pairs] == case["rates"]
    assert schedule.end_step == case["finished_at_step"]
    for step, expected in case["lr_at_steps"].items():
        step = int(step)
        if step < case["cur_step"]:
            continue
        assert schedule.rate_at(step) == expected, step
    updates = sum(1 for step in range(case["cur_step"], case["max_steps"] + 1) if schedule.rate_at(step) is not None)
    assert updates == case["updates"]
    segments = [{"first_step": s.first, "last_step": s.last, "lr": s.rate} for s in schedule.segments]
    assert segments == case["lr_segments"]
    assert schedule.describe() == case["printed"]


def test_standard_scheduler_with_plain_rate():
    schedule = build_schedule("0.01", max_steps=100, scheduler="linear", warmup_steps=10)
    assert schedule.rate_at(0) == 0.0
    assert schedule.rate_at(10) == pytest.approx(0.01)
    assert schedule.rate_at(55) == pytest.approx(0.005)
    assert schedule.rate_at(100) is None


def test_schedule_string_with_standard_scheduler_is_refused():
    with pytest.raises(ScheduleError, match="cannot be combined"):
        build_schedule("0.01:10, 0.001", max_steps=100, scheduler="cosine")
    assert INVALID_SCHEDULE.startswith("Invalid learning rate schedule")


RESUMABLE = [c for c in CASES if 0 < c["cur_step"] < c["max_steps"]]


@pytest.mark.parametrize("case", RESUMABLE, ids=[f"{c['learn_rate']!r}@{c['cur_step']}/{c['max_steps']}" for c in RESUMABLE])
def test_a_schedule_parsed_once_resumes_as_a1111_parses_it_at_the_resume_step(case):
    """The trainers parse the text once, at step 0, with the command line; a resumed run asks that
    schedule for its start step and must get exactly A1111's schedule parsed at that step."""
    try:
        parsed = ScheduleString(case["learn_rate"], case["max_steps"])
    except ScheduleError:
        return  # refused at step 0 already (before the model loads), whatever the resume step
    if not case["ok"]:
        with pytest.raises(ScheduleError, match=case["exception"]["message"][:30]):
            parsed.resumed_at(case["cur_step"])
        return
    resumed = parsed.resumed_at(case["cur_step"])
    fresh = ScheduleString(case["learn_rate"], case["max_steps"], case["cur_step"])
    assert (resumed.pairs, resumed.segments, resumed.end_step) == (fresh.pairs, fresh.segments, fresh.end_step)
    assert str(resumed) == case["learn_rate"]


def test_the_command_line_schedule_is_parsed_once(tmp_path, monkeypatch):
    """`--learning_rate` arrives in the loop as the parsed schedule; nothing parses the text again."""
    from tinv_lib.training import lr_schedule, textual_inversion

    for folder in ("model", "data"):
        (tmp_path / folder).mkdir()
    calls = []
    real = lr_schedule.parse_schedule
    monkeypatch.setattr(lr_schedule, "parse_schedule", lambda *a, **k: calls.append(a) or real(*a, **k))
    args = textual_inversion.parse_args(["--pretrained_model_name_or_path", str(tmp_path / "model"), "--train_data_dir",
                                         str(tmp_path / "data"), "--placeholder_token", "x-ti", "--learning_rate",
                                         "0.01:10, 0.001", "--max_grad_norm", "1.0", "--max_train_steps", "20"])
    assert len(calls) == 2 and str(args.learning_rate) == "0.01:10, 0.001" and str(args.max_grad_norm) == "1.0"
    assert args.learning_rate.resumed_at(12).rate_at(12) == 0.001 and len(calls) == 2
