"""The embeddings folder: every embedding file under it, kept current without a restart.

What A1111 users expect (docs/formats.md, "The A1111 embeddings folder"), minus its pitfalls:

* recursive (sub-folders count), names are file stems (images: the name stored inside);
* hot reload: each `refresh()` compares every file's mtime, size and inode with the last scan,
  so files added, changed or removed anywhere below the folder are noticed (A1111 only looks at
  the top folder's own mtime and misses changes in sub-folders and in-place overwrites);
  only changed files are read again;
* `*.preview.*` files and zero-byte files (a copy still in progress) are passed over; pictures
  without embedded data are listed as skipped, not as errors;
* training checkpoints (`checkpoint-<step>/` of a training output folder) are passed over without
  a word: their tensors and optimizer state are a run's state, never embeddings;
* an embedding whose width does not fit the loaded model is skipped with a one-line reason;
* a broken file is reported in one line and never stops the others;
* duplicate names (compared case-insensitively, as prompts match them) have a defined winner:
  among the files that fit the model, the one nearest the top of the folder, then the first in
  path order; each loser is listed as skipped, naming the file that won (A1111 keeps whichever
  file the filesystem happens to list last);
* an embedding that records a different base model than the loaded one gets one notice.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from tinv_lib.common.errors import TinvError, first_line
from tinv_lib.common.training_folders import is_training_checkpoint
from tinv_lib.embeddings.formats import EMBEDDING_SUFFIXES, Embedding, NotAnEmbeddingError, load_embedding
from tinv_lib.models.architecture import takes_some_encoders

Dim = int | dict[str, int]


@dataclass
class _ScannedFile:
    """One file as last read: its identity (to notice changes) and what reading it gave."""

    signature: tuple[int, int, int]
    embedding: Embedding | None = None
    error: str | None = None
    not_embedding: str | None = None


def is_candidate(path: Path) -> bool:
    """Whether a file in the folder should be read as an embedding at all."""
    name = path.name.lower()
    return path.suffix.lower() in EMBEDDING_SUFFIXES and ".preview." not in name and not name.startswith(".")


def _signature(stat: os.stat_result) -> tuple[int, int, int]:
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


def width_mismatch(embedding: Embedding, expected: Dim | None) -> str | None:
    """Why `embedding` cannot be used with a model whose text width is `expected`, or None."""
    if expected is None or embedding.dim == expected or _fits_some_encoders(embedding.dim, expected):
        return None  # an int never equals a dict: forms must match too
    dim = embedding.dim
    whole = isinstance(dim, dict) and isinstance(expected, dict) and all(expected.get(k) == w for k, w in dim.items())
    why = ": it takes every encoder's vectors or none" if whole else ""
    return f"{embedding.name}: {_dim_text(dim)} does not fit the loaded model ({_dim_text(expected)}){why}"


def _fits_some_encoders(dim: Dim, expected: Dim) -> bool:
    """A per-encoder file that is not the model's whole form but fits it: one encoder's vectors on a
    one-encoder model when the width fits (A1111 reads any one-tensor file, whatever its key), and
    some encoders' vectors on FLUX.1/SD3, which put them in those encoders alone (SD3 files with
    CLIP keys only, as A1111 writes them; FLUX.1 files with CLIP-L's vectors only, as CLIP-only
    training writes them). SDXL, as A1111, takes both encoders' vectors or none."""
    if not isinstance(dim, dict) or not dim:
        return False
    if not isinstance(expected, dict):
        return list(dim.values()) == [expected]
    return takes_some_encoders(expected) and all(expected.get(key) == width for key, width in dim.items())


def _dim_text(dim: Dim) -> str:
    """`width 768`, or `key 768 + key 1280` for one width per encoder."""
    return " + ".join(f"{key} {value}" for key, value in dim.items()) if isinstance(dim, dict) else f"width {dim}"


def model_mismatch(embedding: Embedding, model_hashes: Iterable[str]) -> bool:
    """True when the embedding records a base model and none of the loaded model's hashes
    (10-hex short hash, 8-hex old hash, or full sha256) is that model."""
    recorded = (embedding.sd_checkpoint or "").strip().lower()
    hashes = [h.lower() for h in model_hashes if h]
    if not recorded or not hashes:
        return False
    return not any(h.startswith(recorded) or recorded.startswith(h) for h in hashes)


class EmbeddingDatabase(Mapping[str, Embedding]):
    """Embeddings found under one or more folders, by name (case-insensitive lookups).

    Call `refresh()` before each use (e.g. before every prompt): it is cheap when nothing
    changed. `skipped` maps a name or path to the reason it is not usable; `errors` maps broken
    files to a one-line message; `notices` collects model-mismatch notices (also sent to
    `notify` as they happen).
    """

    def __init__(
        self,
        folders: str | os.PathLike | Iterable[str | os.PathLike] = "embeddings",
        expected_dim: Dim | None = None,
        model_hashes: Iterable[str] = (),
        model_name: str | None = None,
        notify: Callable[[str], None] | None = None,
    ) -> None:
        if isinstance(folders, (str, os.PathLike)):
            folders = [folders]
        self.folders = [Path(folder) for folder in folders]
        self.expected_dim = expected_dim
        self.model_hashes = tuple(model_hashes)
        self.model_name = model_name
        self.notify = notify
        self.skipped: dict[str, str] = {}
        self.errors: dict[str, str] = {}
        self.notices: list[str] = []
        self._files: dict[Path, _ScannedFile] = {}
        self._by_key: dict[str, Embedding] = {}
        self._noticed: set[tuple[str, str]] = set()
        self._stale = True

    # ---- Mapping interface: the usable embeddings, keyed by name

    def __getitem__(self, name: str) -> Embedding:
        return self._by_key[name.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted((emb.name for emb in self._by_key.values()), key=str.lower))

    def __len__(self) -> int:
        return len(self._by_key)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._by_key

    # ---- the model the embeddings must fit

    def set_model(self, expected_dim: Dim | None, model_hashes: Iterable[str] = (), model_name: str | None = None) -> None:
        """Switch the model embeddings are checked against (no file is read again)."""
        self.expected_dim = expected_dim
        self.model_hashes = tuple(model_hashes)
        self.model_name = model_name
        self._stale = True

    # ---- scanning

    def _walk(self) -> dict[Path, tuple[int, int, int]]:
        """Every candidate file under the folders with its current signature."""
        found: dict[Path, tuple[int, int, int]] = {}
        visited: set[str] = set()
        for folder in self.folders:
            for root, dirs, files in os.walk(folder, followlinks=True):
                real = os.path.realpath(root)
                if real in visited:  # a symlinked folder seen before (or a link cycle)
                    dirs.clear()
                    continue
                visited.add(real)
                dirs[:] = sorted(name for name in dirs if not is_training_checkpoint(Path(root) / name))
                for file_name in sorted(files):
                    path = Path(root) / file_name
                    if not is_candidate(path):
                        continue
                    try:
                        stat = path.stat()
                    except OSError:
                        continue  # removed while we looked
                    if stat.st_size > 0:
                        found[path] = _signature(stat)
        return found

    @staticmethod
    def _read(path: Path, signature: tuple[int, int, int]) -> _ScannedFile:
        try:
            return _ScannedFile(signature, embedding=load_embedding(path))
        except NotAnEmbeddingError as error:
            return _ScannedFile(signature, not_embedding=str(error))
        except TinvError as error:
            return _ScannedFile(signature, error=str(error))
        except Exception as error:  # noqa: BLE001 - a broken file must never stop the others
            return _ScannedFile(signature, error=f"{path}: cannot load ({first_line(error, with_type=True)})")

    def refresh(self, force: bool = False) -> bool:
        """Re-scan the folders; read new and changed files, forget removed ones.

        Returns True when the set of files or the model changed (so the registry was rebuilt).
        `force` reads every file again.
        """
        current = self._walk()
        changed = force or self._stale or current.keys() != self._files.keys()
        for path, signature in current.items():
            known = self._files.get(path)
            if force or known is None or known.signature != signature:
                self._files[path] = self._read(path, signature)
                changed = True
        for path in list(self._files):
            if path not in current:
                del self._files[path]
        if changed:
            self._register()
        return changed

    def _order(self, path: Path) -> tuple[int, int, str]:
        """Duplicate-name priority: earlier folder, then shallower, then path order."""
        for index, folder in enumerate(self.folders):
            try:
                relative = path.relative_to(folder)
            except ValueError:
                continue
            return (index, len(relative.parts), relative.as_posix())
        return (len(self.folders), len(path.parts), path.as_posix())

    def _register(self) -> None:
        """Rebuild the usable set from the scanned files and the current model."""
        self._by_key, self.skipped, self.errors = {}, {}, {}
        for path in sorted(self._files, key=self._order):
            scanned = self._files[path]
            if scanned.error:
                self.errors[str(path)] = scanned.error
                continue
            if scanned.not_embedding:
                self.skipped[str(path)] = scanned.not_embedding
                continue
            embedding = scanned.embedding
            assert embedding is not None
            reason = width_mismatch(embedding, self.expected_dim)
            if reason:
                self.skipped[str(path)] = reason
                continue
            key = embedding.name.lower()
            if key in self._by_key:
                winner = self._by_key[key].path
                self.skipped[str(path)] = f"{embedding.name}: duplicate name, {winner} is used instead"
                continue
            self._by_key[key] = embedding
            self._notice_model_mismatch(embedding)
        self._stale = False

    def _notice_model_mismatch(self, embedding: Embedding) -> None:
        """One notice per embedding (and recorded model) whose base model differs from ours."""
        if not model_mismatch(embedding, self.model_hashes):
            return
        key = (embedding.name.lower(), embedding.sd_checkpoint or "")
        if key in self._noticed:
            return
        self._noticed.add(key)
        trained_on = f"{embedding.sd_checkpoint_name or 'unknown model'} [{embedding.sd_checkpoint}]"
        loaded = f"{self.model_name or 'the loaded model'} [{self.model_hashes[0]}]"
        message = f"embedding '{embedding.name}' was trained on {trained_on}, not on {loaded}; it may work less well"
        self.notices.append(message)
        if self.notify:
            self.notify(message)

    # ---- reporting

    def summary_lines(self) -> list[str]:
        """A1111-style report: what loaded, what was skipped and why, which files are broken."""
        lines = [f"Textual inversion embeddings loaded({len(self)}): {', '.join(self)}"]
        if self.skipped:
            lines.append(f"Textual inversion embeddings skipped({len(self.skipped)}):")
            lines += [f"  {reason}" for reason in self.skipped.values()]
        if self.errors:
            lines.append(f"Embedding files that could not be read({len(self.errors)}):")
            lines += [f"  {message}" for message in self.errors.values()]
        return lines
