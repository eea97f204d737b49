"""Tests of datainf.data.generation: every rule and template by hand, and the generated datasets."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from datainf.data.generation import (
    MATH_TEMPLATES,
    PHRASE_WORDS,
    SENTENCE_RULES,
    apply_rule,
    make_generation_dataset,
    render_math,
    sentence_prompt,
)
from datainf.errors import ConfigError

PHRASE = "green apple tree"

RULE_CASES = {
    "reverse_words": "tree apple green",
    "alternate_case": "GrEeN aPpLe TrEe",  # letters alternate across the phrase, spaces skipped
    "insert_one": "green 1 apple 1 tree",
    "mask_vowels": "gr**n *ppl* tr**",
    "double_consonants": "ggrreenn apppplle ttrree",
    "capitalise_words": "Green Apple Tree",
    "remove_vowels": "grn ppl tr",
    "append_ly": "greenly applely treely",
    "remove_consonants": "ee ae ee",
    "repeat_words": "green green apple apple tree tree",
}

# (numbers, bare answer, reasoning response) per template, worked out by hand.
MATH_CASES = {
    "pizza_slices": ([12, 5], "60", " 12 x 5 = 60. The answer is 60."),
    "chaperones": ([12, 5], "3", " 12 / 5 rounded up = 3. The answer is 3."),
    "discount": ([17, 6], "15.98", " 17 x (100 - 6) / 100 = 15.98. The answer is 15.98."),
    "garden_area": ([12, 5], "60", " 12 x 5 = 60. The answer is 60."),
    "savings": ([12, 5, 3], "27", " 12 + 5 x 3 = 27. The answer is 27."),
    "simple_interest": ([50, 4, 3], "6", " 50 x 4 / 100 x 3 = 6. The answer is 6."),
    "apples_left": ([12, 5], "2", " 12 mod 5 = 2. The answer is 2."),
    "cycling_distance": ([12, 5], "17", " 12 + 5 = 17. The answer is 17."),
    "grandma_age": ([12, 5, 3], "20", " 12 + 5 + 3 = 20. The answer is 20."),
    "farm_legs": ([12, 5], "58", " 4 x 12 + 2 x 5 = 58. The answer is 58."),
}


def test_there_are_ten_rules_and_templates_all_covered() -> None:
    assert list(SENTENCE_RULES) == list(RULE_CASES)
    assert list(MATH_TEMPLATES) == list(MATH_CASES)
    assert len({r.bot for r in SENTENCE_RULES.values()}) == 10
    assert len({r.title for r in SENTENCE_RULES.values()}) == 10


@pytest.mark.parametrize(("rule", "expected"), list(RULE_CASES.items()))
def test_each_rule_by_hand(rule: str, expected: str) -> None:
    assert apply_rule(rule, PHRASE) == expected


def test_rule_prompt_format() -> None:
    expected = "Bot Zarnik, the Word Reverser: green apple tree ->"
    assert sentence_prompt("reverse_words", PHRASE) == expected


def test_phrase_words_survive_every_rule() -> None:
    # Each word has a vowel and a consonant, so vowel/consonant removal never empties a word.
    for word in PHRASE_WORDS:
        assert word.isalpha() and word.islower()
        for rule in SENTENCE_RULES:
            assert apply_rule(rule, word).strip(), (rule, word)


@pytest.mark.parametrize(("template", "case"), list(MATH_CASES.items()))
def test_each_math_template_by_hand(template: str, case: tuple[list[int], str, str]) -> None:
    numbers, answer, reasoned = case
    prompt, response = render_math(template, numbers, reasoning=False)
    assert response == " " + answer
    assert render_math(template, numbers, reasoning=True) == (prompt, reasoned)
    assert all(str(n) in prompt for n in numbers) and prompt.endswith("?")


def test_math_edge_values() -> None:
    assert render_math("chaperones", [10, 5], reasoning=False)[1] == " 2"  # exact division
    assert render_math("discount", [40, 25], reasoning=False)[1] == " 30"  # whole dollars
    assert render_math("discount", [55, 88], reasoning=False)[1] == " 6.60"  # cents kept
    assert render_math("apples_left", [3, 7], reasoning=False)[1] == " 3"


def test_generator_errors() -> None:
    with pytest.raises(ConfigError, match="Unknown sentence rule"):
        apply_rule("shout", PHRASE)
    with pytest.raises(ConfigError, match="Unknown math template"):
        render_math("tax", [1, 2], reasoning=False)
    with pytest.raises(ConfigError, match="2 integers in 1..99"):
        render_math("pizza_slices", [1, 2, 3], reasoning=False)
    with pytest.raises(ConfigError, match="1..99"):
        render_math("pizza_slices", [0, 100], reasoning=False)
    with pytest.raises(ConfigError, match="Unknown generation task"):
        make_generation_dataset("poems")
    with pytest.raises(ConfigError, match="n_test_per_class"):
        make_generation_dataset("math", n_per_class=10, n_test_per_class=10)


@pytest.mark.parametrize("name", ["sentence", "math", "math-reason"])
def test_dataset_shape_and_fields(name: str) -> None:
    ds = make_generation_dataset(name, seed=0)
    assert len(ds.train) == 900 and len(ds.test) == 100
    assert len(ds.class_names) == 10
    assert Counter(r["class"] for r in ds.train) == {c: 90 for c in range(10)}
    assert Counter(r["class"] for r in ds.test) == {c: 10 for c in range(10)}
    records = ds.train + ds.test
    assert len({r["id"] for r in records}) == 1000
    assert len({r["prompt"] for r in records}) == 1000  # no prompt repeats, so no test leakage
    for r in records:
        assert set(r) == {"id", "prompt", "response", "class", "class_name"}
        assert r["class_name"] == ds.class_names[r["class"]]
        assert r["response"].startswith(" ") and not r["response"].startswith("  ")
        assert len(r["prompt"] + r["response"]) < 160


def test_sentence_records_follow_their_rule() -> None:
    ds = make_generation_dataset("sentence", seed=4, n_per_class=20, n_test_per_class=5)
    for r in ds.train + ds.test:
        match = re.fullmatch(r"Bot \w+, [\w ]+: ([a-z ]+) ->", r["prompt"])
        assert match, r["prompt"]
        phrase = match.group(1)
        assert 2 <= len(phrase.split()) <= 4
        assert r["response"] == " " + apply_rule(r["class_name"], phrase)
        assert r["prompt"] == sentence_prompt(r["class_name"], phrase)


def test_math_records_follow_their_template() -> None:
    plain = make_generation_dataset("math", seed=2, n_per_class=20, n_test_per_class=5)
    reason = make_generation_dataset("math-reason", seed=2, n_per_class=20, n_test_per_class=5)
    for p, q in zip(plain.train + plain.test, reason.train + reason.test, strict=True):
        numbers = [int(x) for x in re.findall(r"\d+", p["prompt"])]
        assert all(1 <= x <= 99 for x in numbers)
        expected = render_math(p["class_name"], numbers, reasoning=False)
        assert (p["prompt"], p["response"]) == expected
        # Same seed -> same problems; the reasoning response ends in the same answer.
        assert q["prompt"] == p["prompt"]
        assert q["response"].endswith(f" The answer is{p['response']}.")


def test_deterministic_for_a_seed_and_different_for_another() -> None:
    a = make_generation_dataset("sentence", seed=7, n_per_class=15, n_test_per_class=5)
    b = make_generation_dataset("sentence", seed=7, n_per_class=15, n_test_per_class=5)
    c = make_generation_dataset("sentence", seed=8, n_per_class=15, n_test_per_class=5)
    assert a == b
    assert [r["prompt"] for r in a.train] != [r["prompt"] for r in c.train]
    m1 = make_generation_dataset("math", seed=7, n_per_class=15, n_test_per_class=5)
    m2 = make_generation_dataset("math", seed=8, n_per_class=15, n_test_per_class=5)
    assert [r["prompt"] for r in m1.test] != [r["prompt"] for r in m2.test]
