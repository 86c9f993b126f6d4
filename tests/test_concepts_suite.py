"""The textual-inversion concept suite (`benchmarks/concepts.py`): its concepts cover the toy world
and are split once, its cases ask what the docstring says, and --quick runs end to end through
training, tinv's generation and diffusers' `load_textual_inversion` (the numbers: docs/toy_world.md)."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import numpy as np

from benchmarks import concepts, quality
from toy_world import world
from toy_world.data import read_example_scenes


def test_concepts_cover_the_world_and_split_into_halves_of_both_kinds():
    suite = concepts.CONCEPTS
    assert len(suite) >= 16 and len({c.name for c in suite}) == len(suite)
    scenes = [c for c in suite if c.kind == "scene"]
    assert {c.shape for c in suite} == set(world.SHAPES)
    assert {c.colour for c in suite} == set(world.COLOURS)
    assert {c.background for c in scenes} == set(world.BACKGROUNDS)
    assert {c.background_colour for c in scenes} == set(world.BACKGROUND_COLOURS)
    halves = Counter((c.half, c.kind) for c in suite)
    assert halves == {("tuning", "scene"): 4, ("tuning", "object"): 4, ("report", "scene"): 4, ("report", "object"): 4}
    for half in ("tuning", "report"):
        assert {c.shape for c in suite if c.half == half} == set(world.SHAPES)
    tokenizer_words = {word for words in world.ATTRIBUTES.values() for word in words}
    assert not any(c.name in tokenizer_words for c in suite)


def test_captions_name_what_is_not_the_concept(tmp_path):
    """--captions: an object concept's captions name each image's own background (the part that
    should stay promptable); a scene concept's are empty (its background is the concept)."""
    by_kind = {c.kind: c for c in concepts.CONCEPTS}
    for kind, concept in by_kind.items():
        folder = concepts.write_data(concept, tmp_path / kind, masks=False, captions=True)
        for scene, text in zip(read_example_scenes(folder), sorted(folder.glob("*.txt"))):
            expected = (f"on a {world.background_phrase(scene.background, scene.background_colour)} background"
                        if kind == "object" else "")
            assert text.read_text().strip() == expected
        assert len(list(folder.glob("*.txt"))) == concepts.TRAIN_IMAGES
    assert not list(concepts.write_data(by_kind["object"], tmp_path / "plain", masks=False).glob("*.txt"))


def test_training_scenes_fix_what_the_concept_fixes_and_vary_the_rest():
    for concept in concepts.CONCEPTS:
        scenes = concept.scenes()
        assert len(scenes) == concepts.TRAIN_IMAGES and scenes == concept.scenes()  # deterministic
        for scene in scenes:
            assert {k: getattr(scene, k) for k in concept.target} == concept.target
        if concept.kind == "object":
            assert len({(s.background, s.background_colour) for s in scenes}) >= 4


def test_cases_ask_for_the_concept_and_edits_change_only_what_it_leaves_free():
    count = 32
    for concept in concepts.CONCEPTS:
        recon = concepts.reconstruction_cases(concept, concept.name, count)
        edits = concepts.edit_cases(concept, concept.name, count)
        assert [c.seed for c in recon] == [c.seed for c in edits] and len(recon) == count
        assert all(c.prompt == f"a photo of {concept.name}" and c.target == concept.target for c in recon)
        for case in edits:
            assert case.prompt.startswith(f"a photo of {concept.name} on a") and case.prompt.endswith(" background")
            assert {k: case.target[k] for k in concept.target if k != "background"} == {
                k: v for k, v in concept.target.items() if k != "background"} or concept.kind == "object"
            assert case.target["shape"] == concept.shape and case.target["colour"] == concept.colour
            assert case.target["background_colour"] != concept.colour
        asked = {(c.target["background"], c.target["background_colour"]) for c in edits}
        if concept.kind == "scene":
            assert all(b != concept.background and bc == concept.background_colour for b, bc in asked)
            assert {b for b, _ in asked} == set(world.BACKGROUNDS) - {concept.background, "dotted"}
        else:
            assert asked == set(concepts.OBJECT_EDITS)
        # from words: the edit's target in words, one background (an object's prompt is unchanged)
        words = concepts.words_edit_cases(concept, count)
        assert [(c.seed, c.target) for c in words] == [(c.seed, c.target) for c in edits]
        assert all(c.prompt.count(" background") == 1 for c in words)
        if concept.kind == "object":
            assert [c.prompt for c in words] == [c.prompt for c in concepts.edit_cases(concept, concept.words(), count)]
            assert {b for b, _ in asked} == set(world.BACKGROUNDS) - {"dotted"}


def test_recipe_is_the_readme_quickstart_without_its_data_name_and_init():
    recipe = dict(zip(concepts.RECIPE_FLAGS[::2], concepts.RECIPE_FLAGS[1::2]))
    readme = dict(zip(quality.CONCEPT_TRAINING_FLAGS[::2], quality.CONCEPT_TRAINING_FLAGS[1::2]))
    assert recipe == {k: v for k, v in readme.items() if k not in concepts._OWN}
    assert concepts._OWN <= set(readme)


def test_summary_counts_only_drawable_concepts():
    def report(name, kind, words, recon, edit, seconds):
        concept = next(c for c in concepts.CONCEPTS if c.name == name)
        assert concept.kind == kind
        rate = lambda r, e: {"reconstruction": {"match": r}, "edit": {"match": e}}  # noqa: E731
        return {"concept": {"name": name, "kind": kind}, "words": rate(words, 1.0), "trained": rate(recon, edit),
                "time_to_concept": {"cpu_seconds": seconds}}

    summary = concepts.summarize([
        report("toy-s01", "scene", 1.0, 0.9, 0.2, 30.0),
        report("toy-s02", "scene", 0.1, 1.0, 1.0, 10.0),  # not drawable: not counted
        report("toy-o01", "object", 0.8, 0.8, 0.8, 200.0),
        report("toy-o02", "object", 1.0, 0.5, 0.9, None),
    ])
    assert summary == {"concepts": 4, "drawable": 3, "captured": 2, "captured_in_2_cpu_minutes": 1, "objects": 2,
                       "objects_editable": 2, "scenes_editable": 0, "median_cpu_seconds_to_concept": 115.0,
                       "not_drawable": ["toy-s02"]}


def test_quick_suite_trains_judges_and_spot_checks_through_diffusers(tmp_path, capsys):
    out = tmp_path / "concepts.json"
    assert concepts.main(["--quick", "--workers", "1", "--masks", "--work_dir", str(tmp_path / "work"),
                          "--json", str(out), "--save_grids", str(tmp_path / "grids")]) == 0
    printed = capsys.readouterr().out
    assert "toy-s01" in printed and "toy-o01" in printed and printed.count("tuning: captured") == 1
    payload = json.loads(out.read_text())
    assert payload["seeds"] == 2 and payload["masks"] and "--max_train_steps" in payload["flags"]
    for report in payload["concepts"]:
        name = report["concept"]["name"]
        for label in ("words", "untrained", "trained"):
            assert {"reconstruction", "edit"} <= set(report[label])
            assert report[label]["reconstruction"]["seen"]
        assert set(report["time_to_concept"]["curve"]) == {"10"}  # one intermediate save at step 10 of 20
        assert report["training_cpu_seconds"] > 0
        assert report["diffusers"]["n"] == 2 and report["diffusers"]["max_pixel_difference"] <= 2
        vectors = int(dict(zip(concepts.RECIPE_FLAGS[::2], concepts.RECIPE_FLAGS[1::2]))["--num_vectors"])
        assert len(report["diagnostics"]) == vectors and all(d["cosine_to_init"] < 1.0 for d in report["diagnostics"])
        data = tmp_path / "work" / name / "data"
        concept = next(c for c in concepts.CONCEPTS if c.name == name)
        assert read_example_scenes(data) == concept.scenes() and len(list(data.glob("*-masklabel.png"))) == 8
        assert (tmp_path / "grids" / name / "trained-edit.png").is_file()


def test_best_file_is_judged_under_the_concepts_name(tmp_path):
    """`--keep_best` writes `<name>-best.safetensors`: judged as `<name>`, it draws what the same
    vectors draw as `<name>.pt` (read under the file's own name, the prompt would not find it)."""
    from tinv_lib.embeddings.create import create_embedding
    from tinv_lib.embeddings.formats import save_embedding
    from tinv_lib.models.family import family_of
    from toy_world.pipeline import load_toy_pipeline

    pipe = load_toy_pipeline(quality.DEFAULT_MODEL_DIR)
    embedding = create_embedding("toy-o01", family_of(pipe), "red triangle", 2)
    save_embedding(embedding, tmp_path / "toy-o01.pt")
    save_embedding(embedding, tmp_path / "toy-o01-best.safetensors")
    best, final = (concepts.load_trained(tmp_path / f, "toy-o01") for f in ("toy-o01-best.safetensors", "toy-o01.pt"))
    assert best.name == "toy-o01"
    draw = lambda e: quality.tinv_generator(pipe, embeddings={"toy-o01": e}, steps=4)(["a photo of toy-o01"], [1])  # noqa: E731
    plain = quality.tinv_generator(pipe, steps=4)(["a photo of toy-o01"], [1])
    assert np.array_equal(np.asarray(draw(best)[0]), np.asarray(draw(final)[0]))
    assert not np.array_equal(np.asarray(draw(best)[0]), np.asarray(plain[0]))


def test_edits_count_only_where_the_words_draw_the_edit():
    concept = next(c for c in concepts.CONCEPTS if c.name == "toy-s01")
    phrases = [phrase for phrase, _ in concept.edits(8)]
    first = [p == phrases[0] for p in phrases]  # the first edit prompt's seeds
    words = [not f for f in first]  # the model draws every edit prompt but the first
    trained = [True] * 8
    report = {"concept": dataclasses.asdict(concept), "words": {"edit": {"matches": words}},
              "trained": {"edit": {"matches": trained}}}
    assert concepts.drawable_edits(report) == (8 - sum(first), 8 - sum(first)) and 0 < sum(first) < 8
    del report["trained"]["edit"]["matches"]
    assert concepts.drawable_edits(report) is None
