"""The task scorers on hand-written edge cases, exactly as protocol.md section 4 words them."""

import pytest

from hft_bench_plugins.tasks import AGNews, Alpaca, GSM8K, SST2, gsm8k_number

POS, NEG = {"label": 1}, {"label": 0}


@pytest.mark.parametrize(
    "response,row,correct",
    [
        ("positive", POS, True),
        ("Positive", POS, True),
        (" negative", NEG, True),  # stripped
        ("negative\n", NEG, True),
        ("Positive.", POS, False),  # exact match: the full stop makes it wrong
        ("POSITIVE", POS, False),  # only positive/Positive count
        ("The sentiment is positive", POS, False),
        ("negative", POS, False),
        ("", NEG, False),
    ],
)
def test_sst2_is_exact_after_strip(response, row, correct):
    assert SST2().score(response, row) is correct


@pytest.mark.parametrize(
    "response,label,correct",
    [
        ("World", 0, True),
        ("sports", 1, True),  # case-insensitive
        (" BUSINESS \n", 2, True),
        ("Sci/Tech", 3, True),
        ("sci", 3, True),  # accepted for Sci/Tech
        ("Sci", 3, True),
        ("sci", 0, False),  # only for Sci/Tech
        ("Tech", 3, False),
        ("World.", 0, False),
        ("Sports news", 1, False),
    ],
)
def test_agnews_equals_label_name(response, label, correct):
    assert AGNews().score(response, {"label": label}) is correct


@pytest.mark.parametrize(
    "text,number",
    [
        ("The final answer is: 1,234", 1234.0),
        ("The final answer is: 1,234.", 1234.0),
        ("We add 3 and 4. The final answer is: 7 apples, not 9", 7.0),  # first number after the marker
        ("3 + 4 = 7, then 7 * 2 = 14", 14.0),  # no marker: the last number
        ("The final answer is: -5", -5.0),
        ("It drops to -12 degrees", -12.0),
        ("The final answer is: 2.5", 2.5),
        ("The final answer is: $0.75 per apple", 0.75),
        ("The final answer is: 1,000,000", 1e6),
        ("The final answer is: nothing, sorry; earlier I said 8", 8.0),  # marker without a number: last number
        ("no number at all", None),
        ("", None),
    ],
)
def test_gsm8k_number_extraction(text, number):
    assert gsm8k_number(text) == number


def test_gsm8k_score_compares_numerically_with_the_reference():
    row = {"question": "q", "answer": "6 * 2 = 12\n#### 1,200"}
    assert GSM8K().score("The final answer is: 1200", row)
    assert GSM8K().score("The final answer is: 1,200.00", row)
    assert not GSM8K().score("The final answer is: 120", row)
    assert not GSM8K().score("I don't know", row)


def test_task_examples_render_the_protocol_targets():
    assert SST2().example({"sentence": " a fine film ", "label": 1}).output == "positive"
    assert AGNews().example({"text": "x", "label": 3}).output == "Sci/Tech"
    gsm = GSM8K().example({"question": "How many?", "answer": "2+2=4\n#### 4"})
    assert gsm.output == "2+2=4\nThe final answer is: 4" and gsm.input == ""
    assert Alpaca.scored is False
