"""`<hypernet:NAME:MULT>` prompt tags and the hypernetwork folder
(docs/hypernetworks.md, "Using hypernetworks").
"""

import os

import pytest
from helpers_embeddings import tiny_pipeline

from tinv_lib.generation.extra_networks import HypernetworkHandler
from tinv_lib.generation.txt2img import generate
from tinv_lib.hypernetworks import (
    context_widths,
    create_hypernetwork,
    list_hypernetworks,
    make_options,
    save_hypernetwork,
)
from tinv_lib.prompts.syntax import parse_extra_networks


def test_tags_are_removed_and_grouped_by_kind_in_order():
    clean, tags = parse_extra_networks("a cat <hypernet:anime style:0.6>, sitting<hypernet:b> <lora:x:0.8><hypernet:c:2:extra>")
    assert clean == "a cat , sitting "
    assert tags == {"hypernet": [["anime style", "0.6"], ["b"], ["c", "2", "extra"]], "lora": [["x", "0.8"]]}


def test_text_that_is_not_a_tag_stays():
    assert parse_extra_networks("a <b> c <not a tag:1> <x-y:1>") == ("a <b> c <not a tag:1> <x-y:1>", {})


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("sd1")


def test_other_extra_networks_are_removed_and_reported_as_skipped(pipe, tmp_path):
    result = generate(pipe, "photo <lora:thing:0.8> of", steps=1, width=64, height=64,
                      extra_networks={"hypernet": HypernetworkHandler(tmp_path)})
    assert result.notices == ["Skipping unknown extra network: lora"]


def _write(path, name="n"):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_hypernetwork(create_hypernetwork(name, [8], make_options(), seed=0), path)


def test_listing_is_recursive_by_stem_later_duplicates_win_and_none_is_skipped(tmp_path):
    for relative in ("top.pt", "A/dup.pt", "b/dup.pt", "deep/er/inner.pt", "None.pt"):
        _write(tmp_path / relative)
    (tmp_path / "notes.txt").write_text("not a network")
    listed = list_hypernetworks(tmp_path)
    assert sorted(listed) == ["dup", "inner", "top"]
    assert listed["dup"] == tmp_path / "b" / "dup.pt"


def test_handler_applies_named_files_at_their_multiplier_in_order(pipe, tmp_path):
    widths = context_widths(pipe.unet)
    for name in ("style", "other"):
        save_hypernetwork(create_hypernetwork(f"inner {name}", widths, make_options(), seed=0), tmp_path / f"{name}.pt")
    handler = HypernetworkHandler(tmp_path, notify=pytest.fail)
    _, tags = parse_extra_networks("x <hypernet:other:0.25> <hypernet:style>")
    with handler(pipe, tags["hypernet"]):
        pass
    assert handler.applied == [("other", 0.25), ("style", 1.0)]


def test_handler_reuses_unchanged_files_and_reloads_changed_ones(pipe, tmp_path):
    """The folder is read at every use, a file only when its mtime or size changed: a file broken
    behind the cache's back (same size, same mtime) still applies; touched, it is read again."""
    path = tmp_path / "style.pt"
    save_hypernetwork(create_hypernetwork("first", context_widths(pipe.unet), make_options(), seed=0), path)
    notices = []
    handler = HypernetworkHandler(tmp_path, notify=notices.append)
    with handler(pipe, [["style"]]):
        pass
    stat = path.stat()
    path.write_bytes(b"x" * stat.st_size)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with handler(pipe, [["style"]]):
        pass
    assert handler.applied == [("style", 1.0)] and notices == []
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with handler(pipe, [["style"]]):
        pass
    assert handler.applied == [] and len(notices) == 1 and notices[0].startswith("<hypernet:style>: skipped: ")


def test_handler_reports_every_unusable_tag_in_one_line_and_applies_the_rest(pipe, tmp_path):
    """generate.py's `<hypernet:...>` handler: a broken file, an unknown name, a bad multiplier and
    a network for another model family are each one notice; the good tag is still applied."""
    widths = context_widths(pipe.unet)
    save_hypernetwork(create_hypernetwork("good", widths, make_options(), seed=0), tmp_path / "good.pt")
    save_hypernetwork(create_hypernetwork("wide", [4096], make_options(), seed=0), tmp_path / "wide.pt")
    (tmp_path / "broken.pt").write_bytes(b"PK\x03\x04 not really a zip")
    notices = []
    handler = HypernetworkHandler(tmp_path, notify=notices.append)
    assert handler.summary_line() == "Hypernetworks available(3): broken, good, wide"
    tags = [["broken"], ["missing"], ["good", "strong"], ["wide"], ["good", "0.5"]]
    with handler(pipe, tags):
        pass
    assert handler.applied == [("good", 0.5)]
    assert len(notices) == 4 and all("\n" not in n and "skipped" in n for n in notices)
    assert notices[0].startswith("<hypernet:broken>: skipped: ") and "broken.pt" in notices[0]
    assert notices[1] == f"<hypernet:missing>: no hypernetwork 'missing' in {tmp_path}; skipped"
    assert notices[2] == "<hypernet:good:strong>: multiplier 'strong' is not a number; skipped"
    assert notices[3].startswith("<hypernet:wide>: skipped: its sizes [4096] fit none of this model's attention widths")
