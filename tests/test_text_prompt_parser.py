"""parse_prompt_attention must reproduce AUTOMATIC1111's emphasis semantics.

The first block of cases is the docstring table of A1111's
``modules/prompt_parser.py::parse_prompt_attention`` (outputs as lists of tuples);
the rest are derived from the documented rules (escapes, nesting, BREAK, merging).
"""

import pytest

from bdm.text.prompt_parser import parse_prompt_attention

A1111_DOCSTRING_CASES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]

RULE_CASES = [
    ("", [("", 1.0)]),
    ("[x]", [("x", 1 / 1.1)]),
    ("(x:1.3)", [("x", 1.3)]),
    ("(x: 1.3 )", [("x", 1.3)]),
    ("(x:-0.5)", [("x", -0.5)]),
    ("((x))", [("x", 1.1 * 1.1)]),
    ("[[x]]", [("x", (1 / 1.1) * (1 / 1.1))]),
    ("([x])", [("x", 1.0)]),  # 1/1.1 * 1.1 == 1.0 exactly in floats
    ("((x:2):3)", [("x", 6.0)]),
    ("[unclosed", [("unclosed", 1 / 1.1)]),
    ("a ) b ] c", [("a ) b ] c", 1.0)]),  # closers without openers are literal
    ("ratio 16:9", [("ratio 16:9", 1.0)]),  # plain ':' is literal
    ("x:1.5)", [("x:1.5)", 1.0)]),  # weight closer without '(' is literal
    ("\\\\", [("\\", 1.0)]),
    ("a\\b", [("ab", 1.0)]),  # lone backslash vanishes
    ("\\(x\\)", [("(x)", 1.0)]),
    ("(\\(x\\))", [("(x)", 1.1)]),
    ("(猫:1.5)和狗", [("猫", 1.5), ("和狗", 1.0)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("BREAK", [("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("aBREAK b", [("aBREAK b", 1.0)]),  # BREAK must be a whole word
    ("a break b", [("a break b", 1.0)]),  # and upper case
    ("a\nBREAK\nb", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    # inside brackets the marker is scaled like any piece (A1111 behaviour)
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
    ("(a)(b)[c]", [("ab", 1.1), ("c", 1 / 1.1)]),
    ("(x:1.2.3)", [("x:1.2.3)", 1.1)]),  # malformed number: literal, bracket auto-closed
]


@pytest.mark.parametrize("text,expected", A1111_DOCSTRING_CASES)
def test_a1111_docstring_table_exact(text, expected):
    assert parse_prompt_attention(text) == expected


@pytest.mark.parametrize("text,expected", RULE_CASES)
def test_documented_rules(text, expected):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], abs=1e-12)


def test_returns_tuples_and_never_empty():
    for text in ["", "()", "[]", "((()))"]:
        got = parse_prompt_attention(text)
        assert got and all(isinstance(p, tuple) and len(p) == 2 for p in got)
        assert "".join(t for t, _ in got) == ""


def test_text_is_preserved_apart_from_syntax():
    text = "一只(可爱的:1.3)猫, [模糊], ((高质量))"
    assert "".join(t for t, _ in parse_prompt_attention(text)) == "一只可爱的猫, 模糊, 高质量"
