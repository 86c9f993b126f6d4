"""A1111 prompt rules on text and token ids: emphasis parsing, BREAK, 75-token chunks, comma
backtrack, embedding names matched on tokens (longest match, case-insensitive)."""

from __future__ import annotations

import pytest
import torch

from tinv_lib.common.errors import TinvError
from tinv_lib.embeddings import Embedding
from tinv_lib.prompts.syntax import ChunkRules, EmbeddingLookup, chunk_prompt, parse_prompt_attention


def approx(runs):
    return [(text, pytest.approx(weight)) for text, weight in runs]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [  # A1111's own documented examples (prompt_parser.parse_prompt_attention)
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
             (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)],
        ),
        ("[a]", [("a", 1 / 1.1)]),
        ("(a:1.2) b:c", [("a", 1.2), (" b:c", 1.0)]),
        ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("a break b", [("a break b", 1.0)]),  # BREAK is upper case only
        ("", [("", 1.0)]),
    ],
)
def test_parse_prompt_attention(prompt, expected):
    assert parse_prompt_attention(prompt) == approx(expected)


def test_exact_a1111_float_products():
    """Weights are products in A1111's order, not rounded: (((x))) is 1.1·1.1·1.1 exactly."""
    assert parse_prompt_attention("(((sky)))") == [("sky", 1.1 * 1.1 * 1.1)]


def test_bad_weight_is_a_one_line_error():
    with pytest.raises(TinvError, match="not a number"):
        parse_prompt_attention("(a:1.2.3)")


# ------------------------------------------------------------------ chunking on real token ids


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from testing.tokenizer_build import build_clip_tokenizer

    return build_clip_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tools(tokenizer):
    def tokenize(texts):
        return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]

    rules = ChunkRules(
        start_id=tokenizer.bos_token_id,
        end_id=tokenizer.eos_token_id,
        comma_id=tokenizer.get_vocab()[",</w>"],
        vectors_of=lambda embedding: embedding.vector_count,
    )
    return tokenize, rules


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def content(chunk, end_id):
    """The chunk's tokens between BOS and the padding."""
    body = chunk.tokens[1:-1]
    while body and body[-1] == end_id:
        body.pop()
    return body


def test_short_prompt_is_one_chunk_of_77(tokenizer, tools):
    tokenize, rules = tools
    (chunk,) = chunk_prompt("a red tree", tokenize, rules)
    assert len(chunk.tokens) == len(chunk.multipliers) == 77
    assert chunk.tokens == [rules.start_id] + ids(tokenizer, "a red tree") + [rules.end_id] * 73
    assert chunk.multipliers == [1.0] * 77


def test_long_prompt_splits_at_75_tokens(tokenizer, tools):
    tokenize, rules = tools
    tree = ids(tokenizer, "tree")[0]
    chunks = chunk_prompt(" ".join(["tree"] * 80), tokenize, rules)
    assert [content(c, rules.end_id) for c in chunks] == [[tree] * 75, [tree] * 5]


def test_break_pads_out_the_chunk(tokenizer, tools):
    tokenize, rules = tools
    chunks = chunk_prompt("a cat BREAK a dog", tokenize, rules)
    assert [content(c, rules.end_id) for c in chunks] == [ids(tokenizer, "a cat"), ids(tokenizer, "a dog")]


def test_comma_backtrack_moves_the_last_phrase(tokenizer, tools):
    tokenize, rules = tools
    tree, cat, comma = ids(tokenizer, "tree")[0], ids(tokenizer, "cat")[0], rules.comma_id
    prompt = " ".join(["tree"] * 70) + ", " + " ".join(["cat"] * 10)
    chunks = chunk_prompt(prompt, tokenize, rules)
    assert [content(c, rules.end_id) for c in chunks] == [[tree] * 70 + [comma], [cat] * 10]
    far = " ".join(["tree"] * 50) + ", " + " ".join(["cat"] * 30)  # comma 25 tokens back: no move
    assert [len(content(c, rules.end_id)) for c in chunk_prompt(far, tokenize, rules)] == [75, 6]
    off = ChunkRules(rules.start_id, rules.end_id, rules.comma_id, rules.vectors_of, comma_backtrack=0)
    assert [len(content(c, rules.end_id)) for c in chunk_prompt(prompt, tokenize, off)] == [75, 6]


def emb(name, vectors=1):
    return Embedding(name, torch.zeros(vectors, 32))


def test_embeddings_match_longest_name_case_insensitively(tokenizer, tools):
    tokenize, rules = tools
    table = {"my": emb("my", 1), "my-style": emb("my-style", 3)}
    lookup = EmbeddingLookup(table, tokenize)
    (chunk,) = chunk_prompt("a (MY-Style:1.2) of my cat", tokenize, rules, lookup)
    assert [(fix.offset, fix.embedding.name) for fix in chunk.fixes] == [(1, "my-style"), (5, "my")]
    assert chunk.tokens[1:9] == ids(tokenizer, "a") + [0, 0, 0] + ids(tokenizer, "of") + [0] + ids(tokenizer, "cat") + [rules.end_id]
    assert chunk.multipliers[2:5] == [1.2, 1.2, 1.2] and chunk.multipliers[6] == 1.0


def test_name_split_by_emphasis_does_not_match(tokenizer, tools):
    tokenize, rules = tools
    lookup = EmbeddingLookup({"redtree": emb("redtree")}, tokenize)
    (chunk,) = chunk_prompt("(red)tree redtree", tokenize, rules, lookup)
    assert len(chunk.fixes) == 1


def test_embedding_that_does_not_fit_starts_a_new_chunk(tokenizer, tools):
    tokenize, rules = tools
    lookup = EmbeddingLookup({"big": emb("big", 4)}, tokenize)
    chunks = chunk_prompt(" ".join(["tree"] * 73) + " big", tokenize, rules, lookup)
    assert [len(content(c, rules.end_id)) for c in chunks] == [73, 4]
    assert chunks[1].fixes[0].offset == 0 and not chunks[0].fixes


def test_negative_style_several_embeddings_in_one_prompt(tokenizer, tools):
    tokenize, rules = tools
    table = {"badhand": emb("badhand", 2), "easyneg": emb("easyneg", 5)}
    (chunk,) = chunk_prompt("easyneg, badhand, (easyneg:0.5)", tokenize, rules, EmbeddingLookup(table, tokenize))
    assert [fix.embedding.name for fix in chunk.fixes] == ["easyneg", "badhand", "easyneg"]
    assert chunk.multipliers[1 + chunk.fixes[2].offset] == 0.5


def test_emphasis_none_keeps_brackets_as_text(tokenizer, tools):
    tokenize, rules = tools
    (chunk,) = chunk_prompt("(tree:1.5)", tokenize, rules, emphasis="None")
    assert content(chunk, rules.end_id) == ids(tokenizer, "(tree:1.5)") and set(chunk.multipliers) == {1.0}


def test_backtrack_carries_an_embedding_along(tokenizer, tools):
    tokenize, rules = tools
    lookup = EmbeddingLookup({"mine": emb("mine", 2)}, tokenize)
    chunks = chunk_prompt(" ".join(["tree"] * 70) + ", cat mine cat cat cat", tokenize, rules, lookup)
    assert not chunks[0].fixes
    assert [(f.offset, f.embedding.name) for f in chunks[1].fixes] == [(1, "mine")]


# ------------------------------------------------------------------ exact 77-token layouts


def layout(rules, body, weights=None):
    """A1111's chunk as it enters the encoder: start, body, end-padding to 76, end (77 in all)."""
    weights = weights if weights is not None else [1.0] * len(body)
    assert len(body) == len(weights) <= 75
    pad = 75 - len(body)
    return [rules.start_id, *body, *[rules.end_id] * pad, rules.end_id], [1.0, *weights, *[1.0] * pad, 1.0]


def assert_layouts(chunks, expected):
    assert len(chunks) == len(expected)
    for index, (chunk, (tokens, weights)) in enumerate(zip(chunks, expected)):
        assert chunk.tokens == tokens, f"chunk {index} tokens"
        assert chunk.multipliers == pytest.approx(weights), f"chunk {index} weights"


def test_exact_layout_of_a_long_prompt_with_emphasis(tokenizer, tools):
    tokenize, rules = tools
    tree, cat = ids(tokenizer, "tree")[0], ids(tokenizer, "cat")[0]
    chunks = chunk_prompt(" ".join(["tree"] * 74) + " (cat:1.3) [tree] tree", tokenize, rules)
    assert_layouts(chunks, [
        layout(rules, [tree] * 74 + [cat], [1.0] * 74 + [1.3]),
        layout(rules, [tree, tree], [1 / 1.1, 1.0]),
    ])


def test_exactly_75_tokens_is_one_chunk(tokenizer, tools):
    tokenize, rules = tools
    tree = ids(tokenizer, "tree")[0]
    assert_layouts(chunk_prompt(" ".join(["tree"] * 75), tokenize, rules), [layout(rules, [tree] * 75)])
    assert len(chunk_prompt(" ".join(["tree"] * 76), tokenize, rules)) == 2


def test_exact_layout_of_break_with_an_embedding(tokenizer, tools):
    tokenize, rules = tools
    lookup = EmbeddingLookup({"my-style": emb("my-style", 3)}, tokenize)
    chunks = chunk_prompt("a (cat:0.8) BREAK my-style tree", tokenize, rules, lookup)
    assert_layouts(chunks, [
        layout(rules, ids(tokenizer, "a cat"), [1.0, 0.8]),
        layout(rules, [0, 0, 0] + ids(tokenizer, "tree")),
    ])
    assert not chunks[0].fixes and [(f.offset, f.embedding.name) for f in chunks[1].fixes] == [(0, "my-style")]


def test_exact_layout_of_an_embedding_that_does_not_fit(tokenizer, tools):
    tokenize, rules = tools
    tree = ids(tokenizer, "tree")[0]
    lookup = EmbeddingLookup({"big": emb("big", 4)}, tokenize)
    chunks = chunk_prompt(" ".join(["tree"] * 73) + " (big:1.2) tree", tokenize, rules, lookup)
    assert_layouts(chunks, [layout(rules, [tree] * 73), layout(rules, [0] * 4 + [tree], [1.2] * 4 + [1.0])])
    assert [(f.offset, f.embedding.name) for f in chunks[1].fixes] == [(0, "big")]


def test_exact_layout_of_comma_backtrack(tokenizer, tools):
    tokenize, rules = tools
    tree, cat = ids(tokenizer, "tree")[0], ids(tokenizer, "cat")[0]
    chunks = chunk_prompt(" ".join(["tree"] * 70) + ", (cat:1.5) " + " ".join(["cat"] * 9), tokenize, rules)
    assert_layouts(chunks, [
        layout(rules, [tree] * 70 + [rules.comma_id]),
        layout(rules, [cat] * 10, [1.5] + [1.0] * 9),
    ])
