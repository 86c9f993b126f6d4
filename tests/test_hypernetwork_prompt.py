"""`<hypernet:NAME:MULT>` prompt tags and the hypernetwork folder
(docs/hypernetworks.md, "Using hypernetworks").
"""

import logging
import os

import pytest

from tinv_lib.common.errors import TinvError
from tinv_lib.hypernetworks import (
    create_hypernetwork,
    extract_hypernetworks,
    list_hypernetworks,
    make_options,
    parse_extra_networks,
    parse_hypernet_tags,
    save_hypernetwork,
)


def test_tags_are_removed_and_read_in_order_with_default_multiplier():
    clean, tags = parse_hypernet_tags("a cat <hypernet:anime style:0.6>, sitting<hypernet:b> <hypernet:c:2:extra>")
    assert clean == "a cat , sitting "
    assert tags == [("anime style", 0.6), ("b", 1.0), ("c", 2.0)]


def test_other_extra_networks_are_removed_too_and_reported(caplog):
    with caplog.at_level(logging.WARNING):
        clean, tags = parse_hypernet_tags("photo <lora:thing:0.8> of <hypernet:x:0.5>")
    assert clean == "photo  of " and tags == [("x", 0.5)]
    assert "Skipping unknown extra network: lora" in caplog.text


def test_text_that_is_not_a_tag_stays():
    assert parse_extra_networks("a <b> c <not a tag:1> <x-y:1>") == ("a <b> c <not a tag:1> <x-y:1>", [])


def test_bad_multiplier_is_a_one_line_error():
    with pytest.raises(TinvError, match="multiplier 'strong' is not a number"):
        parse_hypernet_tags("<hypernet:x:strong>")


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


def test_extract_loads_named_files_and_skips_missing_ones(tmp_path, caplog):
    _write(tmp_path / "style.pt", name="inner name")
    with caplog.at_level(logging.WARNING):
        clean, stack = extract_hypernetworks("x <hypernet:style:0.25> <hypernet:missing:1>", tmp_path)
    assert clean == "x  "
    assert [(network.name, multiplier) for network, multiplier in stack] == [("inner name", 0.25)]
    assert "'missing' not found" in caplog.text
    assert extract_hypernetworks("no tags", tmp_path / "does-not-exist") == ("no tags", [])


def test_cache_reuses_unchanged_files_and_reloads_changed_ones(tmp_path):
    path = tmp_path / "style.pt"
    _write(path)
    cache = {}
    first = extract_hypernetworks("<hypernet:style>", tmp_path, cache)[1][0][0]
    assert extract_hypernetworks("<hypernet:style>", tmp_path, cache)[1][0][0] is first
    _write(path, name="changed")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert extract_hypernetworks("<hypernet:style>", tmp_path, cache)[1][0][0].name == "changed"


def test_handler_reports_every_unusable_tag_in_one_line_and_applies_the_rest(tmp_path):
    """generate.py's `<hypernet:...>` handler: a broken file, an unknown name, a bad multiplier and
    a network for another model family are each one notice; the good tag is still applied."""
    from helpers_embeddings import tiny_pipeline

    from tinv_lib.generation.extra_networks import HypernetworkHandler
    from tinv_lib.hypernetworks import context_widths

    pipe = tiny_pipeline("sd1")
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
