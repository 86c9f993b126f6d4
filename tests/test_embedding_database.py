"""The embeddings folder: recursive scan, hot reload by file mtimes, skips, duplicates, notices."""

from __future__ import annotations

import os
import shutil

import torch
from helpers_embeddings import FIXTURES, sample_embedding
from PIL import Image

from tinv_lib.embeddings import Embedding, save_embedding
from tinv_lib.embeddings.database import EmbeddingDatabase


def small(name: str, width: int = 32, vectors: int = 1, **meta) -> Embedding:
    return Embedding(name, torch.randn(vectors, width), **meta)


def bump_mtime(path, seconds: int = 5) -> None:
    """Move a file's mtime forward (coarse filesystems may not tick between quick writes)."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + seconds * 1_000_000_000))


def test_recursive_scan_skips_previews_empty_and_other_files(tmp_path):
    save_embedding(small("top"), tmp_path / "top.pt")
    save_embedding(small("deep"), tmp_path / "a" / "b" / "deep.safetensors")
    save_embedding(small("pic"), tmp_path / "a" / "pic.png")
    save_embedding(small("thumb"), tmp_path / "top.preview.png")  # a thumbnail, even with data
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an embedding")
    (tmp_path / "top.pt.optim").write_bytes(b"x")
    db = EmbeddingDatabase(tmp_path, expected_dim=32)
    assert db.refresh() is True
    assert list(db) == ["deep", "pic", "top"]
    assert not db.errors and not db.skipped
    assert db["TOP"].name == "top" and "Deep" in db


def test_hot_reload_sees_added_changed_and_removed_files_in_subfolders(tmp_path):
    save_embedding(small("one"), tmp_path / "one.pt")
    db = EmbeddingDatabase(tmp_path, expected_dim=32)
    db.refresh()
    assert db.refresh() is False  # nothing changed, nothing read
    save_embedding(small("two"), tmp_path / "sub" / "deeper" / "two.pt")
    assert db.refresh() is True and "two" in db
    top_mtime = tmp_path.stat().st_mtime_ns
    replacement = small("one", vectors=3)
    save_embedding(replacement, tmp_path / "one.pt")  # overwritten in place
    bump_mtime(tmp_path / "one.pt")
    os.utime(tmp_path, ns=(top_mtime, top_mtime))  # the folder's own mtime says nothing
    assert db.refresh() is True
    assert db["one"].vector_count == 3 and torch.equal(db["one"].vectors, replacement.vectors)
    # Rewritten through the same inode with the same size, deep in a sub-folder: only the
    # file's mtime tells.
    deep = tmp_path / "sub" / "deeper" / "three.safetensors"
    save_embedding(small("three"), deep)
    assert db.refresh() is True
    inode, size = deep.stat().st_ino, deep.stat().st_size
    other = small("three")
    save_embedding(other, tmp_path / "staging.safetensors")
    with open(deep, "r+b") as handle:
        handle.write((tmp_path / "staging.safetensors").read_bytes())
    (tmp_path / "staging.safetensors").unlink()
    assert (deep.stat().st_ino, deep.stat().st_size) == (inode, size)
    bump_mtime(deep)
    assert db.refresh() is True and torch.equal(db["three"].vectors, other.vectors)
    deep.unlink()
    (tmp_path / "sub" / "deeper" / "two.pt").unlink()
    assert db.refresh() is True and "two" not in db


def test_wrong_width_is_skipped_with_a_one_line_reason(tmp_path):
    save_embedding(small("fits", 32), tmp_path / "fits.pt")
    save_embedding(small("sd2", 48), tmp_path / "sd2.pt")
    save_embedding(Embedding("xl", {"clip_l": torch.randn(1, 32), "clip_g": torch.randn(1, 48)}), tmp_path / "xl.safetensors")
    db = EmbeddingDatabase(tmp_path, expected_dim=32)
    db.refresh()
    assert list(db) == ["fits"]
    reasons = list(db.skipped.values())
    assert len(reasons) == 2 and all("\n" not in reason and "does not fit" in reason for reason in reasons)
    assert any("clip_l 32 + clip_g 48" in reason for reason in reasons)
    db.set_model({"clip_l": 32, "clip_g": 48})  # switching models re-checks without re-reading
    db.refresh()
    assert list(db) == ["xl"]


def test_broken_files_never_stop_the_others(tmp_path):
    save_embedding(small("good"), tmp_path / "good.pt")
    (tmp_path / "broken.pt").write_bytes(b"\x80\x02 this is not a torch file")
    (tmp_path / "broken.safetensors").write_bytes(b"\xff" * 20)
    Image.new("RGB", (16, 16), "red").save(tmp_path / "photo.png")  # a picture, no embedding
    shutil.copy(FIXTURES / "emb-2v768-default.pt", tmp_path / "wide.pt")  # readable, 768 wide
    db = EmbeddingDatabase(tmp_path, expected_dim=32)
    db.refresh()
    assert list(db) == ["good"]
    assert sorted(os.path.basename(path) for path in db.errors) == ["broken.pt", "broken.safetensors"]
    assert all("\n" not in message for message in db.errors.values())
    assert sorted(os.path.basename(path) for path in db.skipped) == ["photo.png", "wide.pt"]
    text = "\n".join(db.summary_lines())
    assert "loaded(1): good" in text and "skipped(2)" in text and "could not be read(2)" in text


def test_duplicate_names_top_level_wins_then_path_order(tmp_path):
    top = small("dup")
    save_embedding(small("dup"), tmp_path / "a" / "dup.safetensors")
    save_embedding(top, tmp_path / "dup.pt")
    save_embedding(small("DUP"), tmp_path / "b" / "DUP.pt")
    save_embedding(small("x"), tmp_path / "b" / "x.pt")
    save_embedding(small("x"), tmp_path / "a" / "x.bin")
    db = EmbeddingDatabase(tmp_path, expected_dim=32)
    db.refresh()
    assert torch.equal(db["dup"].vectors, top.vectors)
    assert db["x"].path == tmp_path / "a" / "x.bin"
    duplicates = [reason for reason in db.skipped.values() if "duplicate name" in reason]
    assert len(duplicates) == 3


def test_duplicate_prefers_the_file_that_fits(tmp_path):
    save_embedding(small("same", 48), tmp_path / "same.pt")
    save_embedding(small("same", 32), tmp_path / "sub" / "same.pt")
    db = EmbeddingDatabase(tmp_path, expected_dim=32)
    db.refresh()
    assert db["same"].dim == 32


def test_model_mismatch_notice_once_per_embedding(tmp_path):
    notices = []
    save_embedding(small("other", sd_checkpoint="aaaaaaaaaa", sd_checkpoint_name="base-x"), tmp_path / "other.pt")
    save_embedding(small("ours", sd_checkpoint="0123456789"), tmp_path / "ours.pt")
    save_embedding(small("old", sd_checkpoint="deadbeef"), tmp_path / "old.pt")  # 8-hex old hash of ours
    save_embedding(small("unknown"), tmp_path / "unknown.pt")
    db = EmbeddingDatabase(tmp_path, 32, model_hashes=("0123456789", "deadbeef"), model_name="mine", notify=notices.append)
    db.refresh()
    save_embedding(small("new"), tmp_path / "new.pt")
    db.refresh()
    db.refresh(force=True)
    assert len(notices) == 1 and db.notices == notices
    assert "'other'" in notices[0] and "base-x [aaaaaaaaaa]" in notices[0] and "mine [0123456789]" in notices[0]


def test_realistic_sizes_and_image_names(tmp_path):
    """A1111 fixtures in a folder: PNGs register under their inner name, .pt under the stem."""
    for name in ("emb-2v768-legacy.pt", "emb-2v768-pixels-only.png", "emb-1v1024-legacy.pt"):
        shutil.copy(FIXTURES / name, tmp_path / name)
    save_embedding(sample_embedding("xl", "sdxl"), tmp_path / "xl.png")
    db = EmbeddingDatabase(tmp_path, expected_dim=768)
    db.refresh()
    assert list(db) == ["emb-2v768-legacy", "fixture-emb-2v"]
    db.set_model(1024)
    db.refresh()
    assert list(db) == ["emb-1v1024-legacy"]
    db.set_model({"clip_l": 768, "clip_g": 1280})
    db.refresh()
    assert list(db) == ["xl"] and db["xl"].step == 1234


def test_symlinked_folders_are_followed_once(tmp_path):
    save_embedding(small("linked"), tmp_path / "real" / "linked.pt")
    (tmp_path / "real" / "loop").symlink_to(tmp_path, target_is_directory=True)  # a cycle
    (tmp_path / "alias").symlink_to(tmp_path / "real", target_is_directory=True)
    db = EmbeddingDatabase(tmp_path, expected_dim=32)
    db.refresh()
    assert list(db) == ["linked"] and not db.skipped
