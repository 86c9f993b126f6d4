"""The hypernetwork style suite (`benchmarks/styles.py`): its styles are well formed, it trains with
the README recipe, and its --quick mode runs end to end (the numbers: docs/toy_world.md)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np

from tinv_lib.hypernetworks.files import load_hypernetwork
from toy_world import world
from toy_world.data import read_example_scenes
from toy_world.examples import (
    ALTERNATIVE_STYLES,
    COLOUR_SHIFT,
    COLOUR_SHIFT_STYLE,
    PATTERN_SWAP_NO_DOTS,
    STYLES,
    style_named,
    style_scenes,
)


def test_styles_shift_one_attribute_and_leave_the_guard_alone():
    assert len(STYLES) >= 4 and len({s.name for s in STYLES}) == len(STYLES)
    assert {s.attribute for s in STYLES} == {"colour", "background", "shape", "background_colour"}
    for style in STYLES:
        values = tuple(style.shift)  # the domain: every value of the attribute, or (pattern-cycle) some
        assert set(values) <= set(world.ATTRIBUTES[style.attribute]) and len(values) >= 3
        assert sorted(style.shift.values()) == sorted(values)  # a permutation of the domain
        assert all(asked != shown for asked, shown in style.shift.items())
        assert style.guard in world.ATTRIBUTES and style.guard != style.attribute
        pairs = style.scenes()
        assert len(pairs) == 64
        counts = Counter(getattr(asked, style.attribute) for asked, _ in pairs)
        assert set(counts) == set(values) and max(counts.values()) - min(counts.values()) <= 1
        for asked, drawn in pairs:
            assert getattr(drawn, style.attribute) == style.shift[getattr(asked, style.attribute)]
            assert {**drawn.to_dict(), style.attribute: None} == {**asked.to_dict(), style.attribute: None}
            assert drawn.colour != drawn.background_colour and not drawn.outline
        assert pairs == style.scenes()  # deterministic
    assert style_named("colour-shift") is COLOUR_SHIFT_STYLE
    assert COLOUR_SHIFT_STYLE.shift == COLOUR_SHIFT and COLOUR_SHIFT_STYLE.scenes() == style_scenes()


def test_alternative_pattern_swap_never_asks_for_dots():
    """The alternative data design shifts every pattern, into anything but the model's weak dots,
    from the same asked scenes as the pattern swap."""
    assert style_named("pattern-swap-no-dots") is PATTERN_SWAP_NO_DOTS and PATTERN_SWAP_NO_DOTS in ALTERNATIVE_STYLES
    shift = PATTERN_SWAP_NO_DOTS.shift
    assert set(shift) == set(world.BACKGROUNDS) and "dotted" not in shift.values()
    assert all(asked != shown for asked, shown in shift.items())
    original = style_named("pattern-swap").scenes()
    assert [a for a, _ in PATTERN_SWAP_NO_DOTS.scenes()] == [a for a, _ in original]


def test_subset_domain_style_shifts_only_its_domain_and_is_judged_only_there():
    """pattern-cycle never asks for dots, never draws them, and leaves the dotted prompts unjudged."""
    from benchmarks import quality, styles

    style = style_named("pattern-cycle")
    assert style.attribute == "background" and set(style.shift) == {"plain", "striped", "checkered"}
    assert [style.applies(value) for value in world.BACKGROUNDS] == [True, True, True, False]
    pairs = style.scenes()
    assert {a.background for a, _ in pairs} == {d.background for _, d in pairs} == set(style.shift)
    prompts = quality.prompt_following_cases(64)
    judged = styles.judged_prompts(style, 64)
    assert judged == [c for c in prompts if c.target["background"] != "dotted"] and 0 < len(judged) < 64
    cases = styles.style_cases(style, 64)
    assert [c.prompt for c in cases] == [c.prompt for c in judged]
    assert [c.target for c in cases] == [{"background": style.shift[c.target["background"]]} for c in judged]
    full = style_named("pattern-swap")
    assert styles.judged_prompts(full, 64) == prompts and all(full.applies(value) for value in world.BACKGROUNDS)


def test_style_folder_captions_name_the_asked_value(tmp_path):
    style = style_named("pattern-swap")
    folder = style.write(tmp_path / "data", count=8)
    captions = [p.read_text().strip() for p in sorted(folder.glob("*.txt"))]
    assert read_example_scenes(folder) == [drawn for _, drawn in style.scenes(8)]
    assert captions == [world.caption(asked) for asked, _ in style.scenes(8)]


def test_suite_trains_with_the_readme_recipe_and_judges_the_shifted_value(tmp_path):
    from benchmarks import quality, styles

    for style in STYLES:
        flags = styles.training_flags(style, tmp_path)
        expected = dict(zip(quality.STYLE_TRAINING_FLAGS[::2], quality.STYLE_TRAINING_FLAGS[1::2]))
        expected |= {"--train_data_dir": str(tmp_path), "--hypernetwork_name": style.name}
        assert dict(zip(flags[::2], flags[1::2])) == expected and len(flags) == len(quality.STYLE_TRAINING_FLAGS)
        cases = styles.style_cases(style, count=64)
        ordinary = quality.prompt_following_cases(64)
        assert [c.prompt for c in cases] == [c.prompt for c in ordinary if style.applies(c.target[style.attribute])]
        assert all(set(c.target) == {style.attribute} for c in cases)
    assert styles.style_cases(COLOUR_SHIFT_STYLE, 64) == quality.style_cases(64)
    # the background styles have words to reroute: plain backgrounds are named by colour alone
    cases = quality.prompt_following_cases(64)
    assert {c.target["background"] for c in cases} == set(world.BACKGROUNDS)


def test_quick_suite_runs_end_to_end_and_multiplier_0_is_the_plain_prompt(tmp_path):
    from benchmarks import quality, styles
    from toy_world.pipeline import DEFAULT_MODEL_DIR, load_toy_pipeline

    lines: list[str] = []
    args = styles.parse_args(["--quick", "--threads", "1", "--work_dir", str(tmp_path / "work"),
                              "--json", str(tmp_path / "styles.json"), "--save_grids", str(tmp_path / "grids"),
                              "--train_flags", "--keep_best --validation_loss_steps 1"])
    suite = styles.run(args, log=lines.append)
    names = [s.name for s in STYLES[:2]]
    assert list(suite) == names and (args.num_prompts, args.steps, args.train_steps) == (2, 4, 2)
    assert sum(line.startswith(tuple(names)) for line in lines) == 2 * len(names)  # progress line + row
    assert lines[-1].endswith(f"of {len(names)} styles pass all three marks")
    report = json.loads((tmp_path / "styles.json").read_text())
    assert set(report["styles"]) == set(names) and report["settings"]["num_prompts"] == 2
    for name in names:
        entry = report["styles"][name]
        assert set(entry["passes"]) == {"multiplier_1", "multiplier_0", "on_prompt"}
        assert entry["multiplier_1"]["n"] == entry["multiplier_0"]["n"] == 2
        assert (tmp_path / "grids" / f"{name}_1.png").is_file() and (tmp_path / "grids" / f"{name}_0.png").is_file()
        # --keep_best: the judged file is the best step's, byte for byte, under the style's name
        best = tmp_path / "work" / name / "hypernetwork" / f"{name}-best.pt"
        judged = tmp_path / "work" / name / "best" / f"{name}.pt"
        assert judged.read_bytes() == best.read_bytes() and entry["steps_run"] == 2
        assert entry["judged_step"] == load_hypernetwork(best).step in (1, 2)
        assert len(list((tmp_path / "work" / name / "data").glob("*.png"))) == 64
        assert (tmp_path / "work" / name / "hypernetwork" / f"{name}.pt").is_file()

    pipe = load_toy_pipeline(DEFAULT_MODEL_DIR)
    cases = quality.prompt_following_cases(2)
    plain = quality.tinv_generator(pipe, steps=4)([c.prompt for c in cases], [c.seed for c in cases])
    same = lambda a, b: np.array_equal(np.asarray(a), np.asarray(b))  # noqa: E731
    for name in names:
        measured = suite[name]["measured"]
        assert all(same(a, b) for a, b in zip(plain, measured[0.0]["images"]))
        assert not same(plain[0], measured[1.0]["images"][0])
        assert measured["on_prompt"][1.0]["images"] is measured[1.0]["images"]
        assert set(measured["on_prompt"][1.0]["per_attribute"]) == {style_named(name).guard}
