"""parse_prompt_attention against AUTOMATIC1111's answers for 104 prompts: spaces around weights, every float form
its pattern takes, BREAK outside and inside brackets, escapes, unbalanced and nested brackets, scheduling syntax read
as text, merging of equal neighbours; and the weights it cannot read as one ValueError naming them."""
from __future__ import annotations

import pytest

from ldm.modules.encoders.prompt_weighting import PromptSyntaxError, has_weighting_syntax, parse_prompt_attention

INF = float("inf")

# Known answers of AUTOMATIC1111/stable-diffusion-webui modules/prompt_parser.py (commit 28bd8e142d5f, the v1.10
# parser: `re_attention` with `:\s*([+-]?[.\d]+)\s*\)`, `re_break`, `parse_prompt_attention`), produced by running
# that function alone in a scratch folder outside this repository (Python 3.11; lark, which only its scheduling
# grammar needs, left out) on each prompt below and pasting repr() of its return value. Weights are exactly its
# floats (1.1 ** 3 == 1.3310000000000004), lists are lists and BREAK's marker is the int -1.
A1111_ANSWERS = [
    # the doctests of A1111 parse_prompt_attention
    ('normal text', [['normal text', 1.0]]),
    ('an (important) word', [['an ', 1.0], ['important', 1.1], [' word', 1.0]]),
    ('(unbalanced', [['unbalanced', 1.1]]),
    ('\\(literal\\]', [['(literal]', 1.0]]),
    ('(unnecessary)(parens)', [['unnecessaryparens', 1.1]]),
    ('a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).',
     [['a ', 1.0], ['house', 1.5730000000000004], [' ', 1.1], ['on', 1.0], [' a ', 1.1], ['hill', 0.55],
      [', sun, ', 1.1], ['sky', 1.4641000000000006], ['.', 1.1]]),
    # empty and trivial
    ('', [['', 1.0]]),
    (' ', [[' ', 1.0]]),
    ('()', [['', 1.0]]),
    ('[]', [['', 1.0]]),
    ('(:1.2)', [['', 1.0]]),
    ('\\', [['', 1.0]]),
    ('((()))', [['', 1.0]]),
    # spaces around weights
    ('(a: 1.2)', [['a', 1.2]]),
    ('(a :1.2)', [['a ', 1.2]]),
    ('(a : 1.2 )', [['a ', 1.2]]),
    ('(a:1.2 )', [['a', 1.2]]),
    ('(a:\t1.2)', [['a', 1.2]]),
    ('(a:\n1.2\n)', [['a', 1.2]]),
    ('(a:1. 2)', [['a:1. 2', 1.1]]),
    ('(a: -0.5)', [['a', -0.5]]),
    ('ratio 3:2 (x: 2)', [['ratio 3:2 ', 1.0], ['x', 2.0]]),
    # float formats
    ('(a:1)', [['a', 1.0]]),
    ('(a:.5)', [['a', 0.5]]),
    ('(a:5.)', [['a', 5.0]]),
    ('(a:+1.5)', [['a', 1.5]]),
    ('(a:-1)', [['a', -1.0]]),
    ('(a:0)', [['a', 0.0]]),
    ('(a:00.50)', [['a', 0.5]]),
    ('(a:1e2)', [['a:1e2', 1.1]]),
    ('(a:1,5)', [['a:1,5', 1.1]]),
    ('(a:1_0)', [['a:1_0', 1.1]]),
    ('(a:)', [['a:', 1.1]]),
    ('(a:1.2', [['a:1.2', 1.1]]),
    ('(a::1.2)', [['a:', 1.2]]),
    ('(a:1.2:1.3)', [['a:1.2', 1.3]]),
    ('(a:1.5) b:2)', [['a', 1.5], [' b:2)', 1.0]]),
    ('(a:\u0661.\u0665)', [['a', 1.5]]),
    ('(a:\uff11.\uff15)', [['a', 1.5]]),
    ("(a:" + "9" * 400 + ")", [['a', INF]]),
    ('a:1.2)', [['a:1.2)', 1.0]]),
    # BREAK
    ('cat BREAK dog', [['cat', 1.0], ['BREAK', -1], ['dog', 1.0]]),
    ('BREAK', [['', 1.0], ['BREAK', -1], ['', 1.0]]),
    ('cat BREAK', [['cat', 1.0], ['BREAK', -1], ['', 1.0]]),
    ('BREAK dog', [['', 1.0], ['BREAK', -1], ['dog', 1.0]]),
    ('cat BREAK BREAK dog', [['cat', 1.0], ['BREAK', -1], ['', 1.0], ['BREAK', -1], ['dog', 1.0]]),
    ('cat\nBREAK\ndog', [['cat', 1.0], ['BREAK', -1], ['dog', 1.0]]),
    ('cat,BREAK,dog', [['cat,', 1.0], ['BREAK', -1], [',dog', 1.0]]),
    ('catBREAK dog', [['catBREAK dog', 1.0]]),
    ('BREAKFAST', [['BREAKFAST', 1.0]]),
    ('break', [['break', 1.0]]),
    ('cat break dog', [['cat break dog', 1.0]]),
    ('(a BREAK b)', [['a', 1.1], ['BREAK', -1.1], ['b', 1.1]]),
    ('[a BREAK b]', [['a', 0.9090909090909091], ['BREAK', -0.9090909090909091], ['b', 0.9090909090909091]]),
    ('(a BREAK b:1.5)', [['a', 1.5], ['BREAK', -1.5], ['b', 1.5]]),
    ('((a BREAK b:0))', [['aBREAKb', 0.0]]),
    ('(a BREAK b:-1)', [['a', -1.0], ['BREAK', 1.0], ['b', -1.0]]),
    ('(a BREAK', [['a', 1.1], ['BREAK', -1.1], ['', 1.1]]),
    ('a (b) BREAK [c]', [['a ', 1.0], ['b', 1.1], ['', 1.0], ['BREAK', -1], ['', 1.0], ['c', 0.9090909090909091]]),
    ('(B\\REAK:-1)', [['BREAK', -1.0]]),
    # escapes
    ('\\(x\\)', [['(x)', 1.0]]),
    ('a\\\\b \\c', [['a\\b c', 1.0]]),
    ('\\[\\]', [['[]', 1.0]]),
    ('end\\', [['end', 1.0]]),
    ('\\((x)\\)', [['(', 1.0], ['x', 1.1], [')', 1.0]]),
    ('(\\(x\\):1.3)', [['(x)', 1.3]]),
    ('a \\:1.2)', [['a :1.2)', 1.0]]),
    # unbalanced
    ('a ((b', [['a ', 1.0], ['b', 1.2100000000000002]]),
    ('a ]b', [['a ]b', 1.0]]),
    ('a )b', [['a )b', 1.0]]),
    ('((a)', [['a', 1.2100000000000002]]),
    ('[[a]', [['a', 0.8264462809917354]]),
    ('(a]', [['a]', 1.1]]),
    ('[a)', [['a)', 0.9090909090909091]]),
    ('(a [b) c]', [['a ', 1.1], ['b', 1.0], [' c', 0.9090909090909091]]),
    ('([a)]', [['a', 1.0]]),
    ('[(a]', [['a', 1.0]]),
    ('[(a', [['a', 1.0]]),
    ('(a ((b)', [['a ', 1.1], ['b', 1.3310000000000004]]),
    # nesting
    ('((a:1.5):2)', [['a', 3.0]]),
    ('[(a:1.5)]', [['a', 1.3636363636363635]]),
    ('(a (b:0.5) c:2)', [['a ', 2.0], ['b', 1.0], [' c', 2.0]]),
    ('(((a)))', [['a', 1.3310000000000004]]),
    ('[[[a]]]', [['a', 0.7513148009015777]]),
    ('[(a)]', [['a', 1.0]]),
    ('([a])', [['a', 1.0]]),
    ('((a)(b))c', [['ab', 1.2100000000000002], ['c', 1.0]]),
    ('(a [b [c (d:0.1)]])', [['a ', 1.1], ['b ', 1.0], ['c ', 0.9090909090909091], ['d', 0.09090909090909093]]),
    # scheduling and alternation: plain text to the attention parser
    ('[a:b:0.5]', [['a:b:0.5', 0.9090909090909091]]),
    ('[a:b:5]', [['a:b:5', 0.9090909090909091]]),
    ('a [b:3]', [['a ', 1.0], ['b:3', 0.9090909090909091]]),
    ('[a|b]', [['a|b', 0.9090909090909091]]),
    ('[(a:1.2):b:0.5]', [['a', 1.0909090909090908], [':b:0.5', 0.9090909090909091]]),
    ('fantasy [mountain:lake:0.25] (oak:1.2)',
     [['fantasy ', 1.0], ['mountain:lake:0.25', 0.9090909090909091], [' ', 1.0], ['oak', 1.2]]),
    # merging of equal neighbours
    ('(a)(b)', [['ab', 1.1]]),
    ('a(b:1)c', [['abc', 1.0]]),
    ('(a:1.1)(b)', [['ab', 1.1]]),
    ('[a](b:0.9090909090909091)', [['ab', 0.9090909090909091]]),
    ('(a:2)(b:2) c', [['ab', 2.0], [' c', 1.0]]),
    # more unbalanced and square brackets, and prompts as shared on Civitai
    ('closed) only] here', [['closed) only] here', 1.0]]),
    ('[faded]', [['faded', 0.9090909090909091]]),
    ('masterpiece, best quality, (1girl:1.2), [[blurry]], (detailed eyes:1.1) BREAK (red dress:0.8), \\(artist\\)',
     [['masterpiece, best quality, ', 1.0], ['1girl', 1.2], [', ', 1.0], ['blurry', 0.8264462809917354], [', ', 1.0],
      ['detailed eyes', 1.1], ['', 1.0], ['BREAK', -1], ['', 1.0], ['red dress', 0.8], [', (artist)', 1.0]]),
    ('a cat <lora:detail-tweaker:0.8>, (smile: 1.2), <hypernet:x:1>',
     [['a cat <lora:detail-tweaker:0.8>, ', 1.0], ['smile', 1.2], [', <hypernet:x:1>', 1.0]]),
    ('(((masterpiece))), (best quality:1.4), (ultra detailed:1.2), [lowres:bad anatomy:0.3], (a (b [c:d:e] f):0.9)',
     [['masterpiece', 1.3310000000000004], [', ', 1.0], ['best quality', 1.4], [', ', 1.0], ['ultra detailed', 1.2],
      [', ', 1.0], ['lowres:bad anatomy:0.3', 0.9090909090909091], [', ', 1.0], ['a ', 0.9],
      ['b ', 0.9900000000000001], ['c:d:e', 0.9], [' f', 0.9900000000000001]]),
]


@pytest.mark.parametrize("prompt, expected", A1111_ANSWERS, ids=[repr(prompt)[:40] for prompt, _ in A1111_ANSWERS])
def test_parser_gives_a1111s_answers(prompt, expected):
    parsed = parse_prompt_attention(prompt)
    assert parsed == expected
    assert repr(parsed) == repr(expected)  # also the types: lists, float weights, the int -1 of an unbracketed BREAK


def test_the_table_is_wide_and_its_prompts_distinct():
    prompts = [prompt for prompt, _ in A1111_ANSWERS]
    assert len(prompts) >= 100 and len(set(prompts)) == len(prompts)


# A1111 fails on these with float()'s ValueError ("could not convert string to float: '1.2.3'"); here the same class
# of error, with a message that names the weight, where it is and what to write instead.
@pytest.mark.parametrize("prompt, weight, position", [
    ("(a:1.2.3)", ":1.2.3)", 3), ("(a:.)", ":.)", 3), ("(a:+.)", ":+.)", 3), ("(a: 1.2.3 )", ": 1.2.3 )", 3),
    ("x (a:..5) y", ":..5)", 5), ("((a:1.5):2.2.)", ":2.2.)", 9),
])
def test_weights_a1111_cannot_read_raise_one_value_error_naming_them(prompt, weight, position):
    with pytest.raises(PromptSyntaxError, match="is not a number") as raised:
        parse_prompt_attention(prompt)
    assert isinstance(raised.value, ValueError)
    assert str(raised.value).startswith(f'the weight in "{weight}" (character {position} of prompt {prompt!r})')
    assert "\n" not in str(raised.value)


def test_a_weight_that_closes_no_bracket_is_text_and_never_read():
    assert parse_prompt_attention("a:1.2.3) b") == [["a:1.2.3) b", 1.0]]


@pytest.mark.parametrize("prompt, expected", [
    ("a castle on a hill: at dusk", False), ("break of dawn", False), ("3:2", False), ("", False),
    ("(a)", True), ("[a]", True), ("(a: 1.2)", True), ("a BREAK b", True), ("\\(a\\)", True), ("(a:1.2.3)", True),
])
def test_has_weighting_syntax(prompt, expected):
    assert has_weighting_syntax(prompt) is expected
