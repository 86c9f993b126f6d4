"""Architecture knowledge stays in `tinv_lib/models/` (docs/architecture.md): no other module of
the library names a text encoder or checks for SDXL by name; they ask the `Architecture`
(its encoders, `pack_vectors`/`unpack_vectors`, its conditioning flags). The one exception is the
embedding-file code, which reads and writes the per-encoder keys files carry."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

from tinv_lib.models.architecture import ARCHITECTURES, SINGLE_KEY

LIBRARY = Path(__file__).resolve().parents[1] / "tinv_lib"
# The code that reads and writes the per-encoder keys of embedding files (docs/formats.md).
FILE_KEY_CODE = ("embeddings/formats.py", "embeddings/image_embed.py")
# Every name an architecture gives one of several encoders (`emb_params`, the key of a single
# encoder's vectors in files, names no encoder).
ENCODER_NAMES = sorted({key for arch in ARCHITECTURES.values() for key in arch.embedding_keys} - {SINGLE_KEY})


def _leaks(source: str) -> list[str]:
    """Each encoder name anywhere (code, strings, comments), each identifier that names SDXL
    (`is_sdxl`, `SDXL`) and each `"sdxl"` string: `line N: text`. Prose "SDXL" is allowed."""
    names = re.compile(r"\b(" + "|".join(map(re.escape, ENCODER_NAMES)) + r")\b")
    found = [(number, line) for number, line in enumerate(source.splitlines(), 1) if names.search(line)]
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        lowered = token.string.lower()
        named = token.type == tokenize.NAME and ("sdxl" in lowered or lowered in ENCODER_NAMES)
        if named or (token.type == tokenize.STRING and "sdxl" in token.string):
            found.append((token.start[0], token.line))
    return [f"line {number}: {line.strip()}" for number, line in sorted(set(found))]


def test_encoder_names_and_sdxl_checks_stay_in_models_and_the_file_code():
    leaks = {}
    for path in sorted(LIBRARY.rglob("*.py")):
        relative = path.relative_to(LIBRARY).as_posix()
        if relative.startswith("models/") or relative in FILE_KEY_CODE:
            continue
        if found := _leaks(path.read_text(encoding="utf-8")):
            leaks[relative] = found
    assert not leaks, "ask the Architecture instead of naming encoders or SDXL:\n" + "\n".join(
        f"{file}: {line}" for file, lines in leaks.items() for line in lines)


def test_the_scan_finds_what_it_looks_for():
    """Not vacuous: each allowed file does carry the keys, and each kind of leak is caught."""
    assert {"clip_l", "clip_g"} <= set(ENCODER_NAMES)
    for relative in FILE_KEY_CODE:
        assert _leaks((LIBRARY / relative).read_text(encoding="utf-8")), relative
    assert _leaks('TRAIN_ENCODERS = ("all", "clip_l", "clip_g")\n')
    assert _leaks("if family.is_sdxl:\n    pass\n")
    assert _leaks("from tinv_lib.models.architecture import SDXL\n")
    assert _leaks('if arch.name == "sdxl":\n    pass\n')
    assert _leaks("x = 1  # the clip_g vectors\n")
    assert not _leaks('"""SDXL takes pooled text."""\nclip_grad_value = 1\n')
