"""A1111 infotext: the `parameters` text in every PNG we generate, written and read back.

The format (docs/formats.md, "Infotext"; A1111 v1.10 `create_infotext`):

    <prompt, possibly several lines>
    Negative prompt: <negative prompt>           (only when there is one)
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, ...

The last line holds `key: value` pairs in A1111's fixed order, `None` values left out; a value
containing `,`, `:` or a newline is JSON-quoted. A reader (ours and A1111's) treats the last
line as parameters only when it holds at least three pairs, strips every line, and starts the
negative prompt at a line beginning `Negative prompt:`.

What we write beyond A1111's usual fields, and why:

* `RNG: CPU` — our initial noise comes from a CPU `torch.Generator` seeded per image, which is
  what A1111 does with its "CPU" random-number source, so A1111 reproduces the noise too;
* `Batch size` / `Batch pos` (A1111's own field names from 2022) when a batch held more than
  one image: a batch of two is not bit-identical to two batches of one (float reductions
  differ), so regenerating an image exactly needs its batch.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from tinv_lib.common.errors import TinvError
from tinv_lib.generation.samplers import AUTOMATIC, DEFAULT_SAMPLER

DEFAULT_EMPHASIS = "Original"
NEGATIVE_PREFIX = "Negative prompt:"
PNG_KEY = "parameters"

_FIELD = re.compile(r'\s*(?P<key>\w[\w \-/]+):\s*(?P<value>"(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")

# Fields `parameters_from_fields` understands; any other field is reported as ignored.
_KNOWN = {
    "Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model", "RNG", "TI hashes",
    "Emphasis", "Batch size", "Batch pos", "Version", "Hypernet", "Hypernet strength", "Hypernet hash",
}


class InfotextError(TinvError):
    """An infotext that cannot be read, or a field whose value makes no sense."""


@dataclass
class GenerationParameters:
    """Everything an image's infotext records: enough to make the same image again."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    sampler: str = DEFAULT_SAMPLER
    schedule_type: str = AUTOMATIC
    cfg_scale: float = 7.0
    seed: int = -1
    width: int | None = None
    height: int | None = None
    model_hash: str | None = None
    model: str | None = None
    rng: str = "CPU"
    ti_hashes: str | None = None
    emphasis: str = DEFAULT_EMPHASIS
    batch_size: int = 1
    batch_pos: int = 0
    version: str | None = None


# ------------------------------------------------------------------------------------ writing


def quote(value: object) -> str:
    """A1111's rule: JSON-quote a value containing `,`, `:` or a newline; others stay bare.

    We also quote a value that starts with `"`, which A1111 leaves bare and then misreads.
    """
    text = str(value)
    if "," in text or ":" in text or "\n" in text or text.startswith('"'):
        return json.dumps(text, ensure_ascii=False)
    return text


def number(value: float) -> str:
    """`7.0` → `7`, `7.5` → `7.5`: the way A1111 infotexts show CFG scale."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _uses_brackets(*prompts: str) -> bool:
    return any("(" in prompt or "[" in prompt for prompt in prompts)


def fields_of(params: GenerationParameters) -> list[tuple[str, object | None]]:
    """The parameter line's fields in A1111's order (None = left out)."""
    size = f"{params.width}x{params.height}" if params.width and params.height else None
    emphasis = params.emphasis
    show_emphasis = emphasis != DEFAULT_EMPHASIS and _uses_brackets(params.prompt, params.negative_prompt)
    batched = params.batch_size > 1
    return [
        ("Steps", params.steps),
        ("Sampler", params.sampler),
        ("Schedule type", params.schedule_type),
        ("CFG scale", number(params.cfg_scale)),
        ("Seed", params.seed),
        ("Size", size),
        ("Model hash", params.model_hash or None),
        ("Model", params.model or None),
        ("RNG", None if params.rng == "GPU" else params.rng),
        # A1111's `extra_generation_params`, in the order A1111 adds them
        ("TI hashes", params.ti_hashes or None),
        ("Emphasis", emphasis if show_emphasis else None),
        ("Batch size", params.batch_size if batched else None),
        ("Batch pos", params.batch_pos if batched else None),
        ("Version", params.version or None),
    ]


def format_infotext(params: GenerationParameters) -> str:
    """The `parameters` text A1111 would write for these settings."""
    line = ", ".join(f"{key}: {quote(value)}" for key, value in fields_of(params) if value is not None)
    negative = f"\n{NEGATIVE_PREFIX} {params.negative_prompt}" if params.negative_prompt else ""
    return f"{params.prompt}{negative}\n{line}".strip()


# ------------------------------------------------------------------------------------ reading


def unquote(value: str) -> str:
    """Undo `quote`: a `"..."` value is JSON; anything that does not decode stays as it is."""
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            decoded = json.loads(value)
        except ValueError:
            return value
        return decoded if isinstance(decoded, str) else value
    return value


def parse_fields(line: str) -> dict[str, str]:
    """`key: value` pairs of a parameter line, unquoted, in order."""
    return {match["key"]: unquote(match["value"].strip()) for match in _FIELD.finditer(line) if match["key"]}


def parse_infotext(text: str) -> dict[str, str]:
    """Split an infotext into `Prompt`, `Negative prompt` and its fields (raw strings).

    Reads exactly what A1111 reads: the last line counts as parameters only with three or more
    pairs; every line is stripped.
    """
    *lines, last = text.strip().split("\n")
    if len(_FIELD.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE_PREFIX):
            negative.append(line[len(NEGATIVE_PREFIX):].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    return {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative), **parse_fields(last)}


def _as_int(fields: dict[str, str], key: str, default: int) -> int:
    if key not in fields:
        return default
    try:
        return int(fields[key])
    except ValueError:
        raise InfotextError(f"infotext field {key}: {fields[key]!r} is not a whole number") from None


def _as_float(fields: dict[str, str], key: str, default: float) -> float:
    if key not in fields:
        return default
    try:
        return float(fields[key])
    except ValueError:
        raise InfotextError(f"infotext field {key}: {fields[key]!r} is not a number") from None


def _size(fields: dict[str, str]) -> tuple[int | None, int | None]:
    if "Size" not in fields:
        return None, None
    match = _SIZE.match(fields["Size"].strip())
    if match is None:
        raise InfotextError(f"infotext field Size: {fields['Size']!r} is not WIDTHxHEIGHT")
    return int(match[1]), int(match[2])


def _legacy_hypernet(fields: dict[str, str]) -> str:
    """Pre-2023 images name their hypernetwork in fields; A1111 turns that into a prompt tag."""
    name = fields.get("Hypernet")
    if not name:
        return ""
    return f"<hypernet:{name}:{fields.get('Hypernet strength', '1.0')}>"


def parameters_from_fields(fields: dict[str, str]) -> tuple[GenerationParameters, dict[str, str]]:
    """`GenerationParameters` from parsed fields, plus the fields it does not use (ignored).

    Missing fields take A1111's meaning: no `Schedule type` is Automatic, no `RNG` is the GPU,
    no `Emphasis` is Original. `Clip skip: 1` is the default and not reported as ignored.
    """
    width, height = _size(fields)
    params = GenerationParameters(
        prompt=fields.get("Prompt", "") + _legacy_hypernet(fields),
        negative_prompt=fields.get("Negative prompt", ""),
        steps=_as_int(fields, "Steps", 20),
        sampler=fields.get("Sampler", DEFAULT_SAMPLER),
        schedule_type=fields.get("Schedule type", AUTOMATIC),
        cfg_scale=_as_float(fields, "CFG scale", 7.0),
        seed=_as_int(fields, "Seed", -1),
        width=width,
        height=height,
        model_hash=fields.get("Model hash"),
        model=fields.get("Model"),
        rng=fields.get("RNG", "GPU"),
        ti_hashes=fields.get("TI hashes"),
        emphasis=fields.get("Emphasis", DEFAULT_EMPHASIS),
        batch_size=_as_int(fields, "Batch size", 1),
        batch_pos=_as_int(fields, "Batch pos", 0),
        version=fields.get("Version"),
    )
    ignored = {
        key: value for key, value in fields.items()
        if key not in _KNOWN and key not in ("Prompt", "Negative prompt") and not (key == "Clip skip" and value == "1")
    }
    return params, ignored


def parameters_from_infotext(text: str) -> tuple[GenerationParameters, dict[str, str]]:
    """Parse an infotext into settings (see `parameters_from_fields`)."""
    return parameters_from_fields(parse_infotext(text))


def ti_hash_entries(value: str | None) -> dict[str, str]:
    """`"a: 0123456789ab, b: ..."` (the `TI hashes` value) → `{name: hash}`."""
    entries = {}
    for part in (value or "").split(","):
        name, _, digest = part.partition(":")
        if name.strip() and digest.strip():
            entries[name.strip()] = digest.strip()
    return entries


# ------------------------------------------------------------------------------ image files


def read_infotext(path: str | os.PathLike) -> str:
    """The `parameters` text of a PNG (tEXt or iTXt chunk), or of a `.txt` infotext file."""
    path = Path(path)
    if path.suffix.lower() == ".txt":
        try:
            return path.read_text(encoding="utf-8")
        except OSError as error:
            raise InfotextError(f"{path}: cannot read ({error.strerror or error})") from None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            text = getattr(image, "text", {}).get(PNG_KEY) or image.info.get(PNG_KEY)
    except FileNotFoundError:
        raise InfotextError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError) as error:
        raise InfotextError(f"{path}: not a readable image ({error})") from None
    if not isinstance(text, str) or not text.strip():
        raise InfotextError(f"{path}: has no A1111 '{PNG_KEY}' text (not made by A1111 or tinv, or stripped)")
    return text


def png_info(text: str):
    """A `PngInfo` carrying `text` as the `parameters` chunk (iTXt when not Latin-1, as Pillow does)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(PNG_KEY, text)
    return info
