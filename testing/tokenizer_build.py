"""A CLIP-format BPE tokenizer made in code, for tiny offline models.

The real CLIP tokenizer files cannot be downloaded here, and the 1000-entry test tokenizers of
the hub split every real word into characters, which makes init-text tests meaningless. This
module writes a genuine CLIP BPE vocabulary (`vocab.json` + `merges.txt`: 256 byte-level
characters, the same with the `</w>` word end, merge results, `<|startoftext|>` and
`<|endoftext|>`) whose merges turn every word of `COMMON_WORDS` into a single token.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"

# The toy world's nouns and adjectives, A1111 template words and everyday words.
COMMON_WORDS = """
a an the of in on at to with and or for from by as is are be it its this that my your our their
his her one two three four five some many few all no not very more most
photo photograph picture image painting drawing sketch illustration render rendering art artwork
style styled portrait landscape still life scene view close up shot cropped clean dirty dark bright
good nice small large big little tiny huge weird cool pretty beautiful ugly old new young
black white red green blue yellow orange purple pink brown gray grey cyan magenta gold silver teal
circle square triangle star ring cross heart diamond hexagon oval rectangle line dot dots shape
shapes stripe stripes striped checkered checker grid noise noisy gradient plain solid dotted
wavy waves texture textured pattern patterned background foreground outline outlined border frame
center centre left right top bottom middle corner edge side
tree trees flower flowers grass forest mountain mountains river lake sea ocean sky cloud clouds sun
moon rain snow water fire stone rock sand beach field garden park road street city town house
building window door wall roof bridge tower castle car bike boat ship train plane
cat cats dog dogs bird birds horse cow fish bear lion tiger fox wolf rabbit mouse duck owl frog
man woman person people boy girl child baby face hand eye eyes hair head body
apple banana cake bread cup bottle book chair table bed lamp clock phone computer toy ball box bag
hat shirt dress shoe shoes glasses
oil watercolor pencil ink digital anime cartoon comic realistic abstract pixel vintage retro modern
classic minimal detailed simple sharp blurry soft hard light heavy warm cold hot wet dry
day night morning evening sunset sunrise summer winter spring autumn
rendition depiction representation artist artists famous work works made done
sitting standing running walking flying swimming lying
inside outside near far above below under over behind front between
have has had do does did make makes show shows look looks like
""".split()


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level mapping: every byte to a printable unicode character."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one pre-token: always merge the lowest-ranked adjacent pair."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
        pairs = {(symbols[i], symbols[i + 1]) for i in range(len(symbols) - 1)}
        best = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
        if best not in ranks:
            break
        merged: list[str] = []
        i = 0
        while i < len(symbols):
            if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def build_merges(words: list[str]) -> list[tuple[str, str]]:
    """Merges that make each word one token.

    Merges are only ever appended (lowest priority), and a word already encoded as one token has
    no pairs left, so adding merges for later words never changes earlier words.
    """
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        symbols = _bpe(word, ranks)
        while len(symbols) > 1:
            ranks[(symbols[0], symbols[1])] = len(ranks)
            symbols = _bpe(word, ranks)
    return list(ranks)


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary order: bytes, bytes + `</w>`, merge results, start, end."""
    characters = list(bytes_to_unicode().values())
    tokens = characters + [c + "</w>" for c in characters] + ["".join(pair) for pair in merges]
    tokens += [START_TOKEN, END_TOKEN]
    return {token: index for index, token in enumerate(tokens)}


def write_clip_tokenizer_files(folder: str | Path, words: list[str] | None = None) -> Path:
    """Write `vocab.json`, `merges.txt` and a `tokenizer_config.json` for CLIPTokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = build_merges(sorted(set(words or COMMON_WORDS)))
    vocab = build_vocab(merges)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def build_clip_tokenizer(folder: str | Path, pad_token: str = END_TOKEN):
    """Write the tokenizer files to `folder` and load them as a transformers CLIPTokenizer.

    SD1's tokenizer pads with `<|endoftext|>`; SD2's and SDXL's second tokenizer pad with `!`.
    """
    from transformers import CLIPTokenizer

    folder = write_clip_tokenizer_files(folder)
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77, pad_token=pad_token)
