"""Checks on the committed candidate lexicon (pipeline/data/lexicon_*.txt).

These run without WordNet installed.  Where Debian's wordnet-base is present,
the lexicon is also rebuilt with build_lexicon.py and compared byte for byte.
"""

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

DATA_DIR = Path(__file__).resolve().parents[1] / "pipeline" / "data"
BUILD_SCRIPT = DATA_DIR / "build_lexicon.py"
WORDNET_DIR = Path("/usr/share/wordnet")

NOUNS = "lexicon_nouns.txt"
ADJECTIVES = "lexicon_adjectives.txt"

# Recorded in pipeline/data/LEXICON.md; built from wordnet-base 1:3.0-37.
EXPECTED_COUNTS = {NOUNS: 58514, ADJECTIVES: 12280}
EXPECTED_SHA256 = {
    NOUNS: "45872f68eeab39f9601e5c63254b638dd62379b40a3c372099e5b685a38f32bf",
    ADJECTIVES: "26d74e63c79ab0410e89c37662b91b637c76c80a80d979a42429dae6666aab33",
}


def read_words(name):
    text = (DATA_DIR / name).read_bytes().decode("utf-8")
    assert text.endswith("\n"), f"{name} must end with a newline"
    assert "\r" not in text, f"{name} must use \\n line endings"
    return text[:-1].split("\n")


@pytest.mark.parametrize("name", [NOUNS, ADJECTIVES])
def test_count(name):
    assert len(read_words(name)) == EXPECTED_COUNTS[name]


@pytest.mark.parametrize("name", [NOUNS, ADJECTIVES])
def test_words_are_clean(name):
    words = read_words(name)
    assert all(words), "empty line"
    assert all(w == w.strip() for w in words), "leading or trailing whitespace"
    assert not [w for w in words if "_" in w], "underscore left in a word"
    assert not [w for w in words if w.endswith(("(a)", "(p)", "(ip)"))], "adjective marker left"
    assert all(w == w.lower() for w in words), "words are lower-cased"


@pytest.mark.parametrize("name", [NOUNS, ADJECTIVES])
def test_sorted_without_duplicates(name):
    words = read_words(name)
    assert len(set(words)) == len(words), "duplicate words"
    assert words == sorted(words), "not sorted"


def test_nouns_and_adjectives_do_not_overlap():
    overlap = set(read_words(NOUNS)) & set(read_words(ADJECTIVES))
    assert not overlap, sorted(overlap)[:10]


def test_lexicon_is_reproducible(tmp_path):
    if (WORDNET_DIR / "data.noun").exists():
        subprocess.run(
            [sys.executable, str(BUILD_SCRIPT), "--wordnet-dir", str(WORDNET_DIR),
             "--out-dir", str(tmp_path)],
            check=True,
            capture_output=True,
        )
        for name in (NOUNS, ADJECTIVES):
            assert (tmp_path / name).read_bytes() == (DATA_DIR / name).read_bytes(), name
    else:
        # No WordNet here: at least pin the committed files to the recorded build.
        for name in (NOUNS, ADJECTIVES):
            digest = hashlib.sha256((DATA_DIR / name).read_bytes()).hexdigest()
            assert digest == EXPECTED_SHA256[name], name


# --- the paper's word files (pipeline/data/paper_lexicon/) ------------------------------------
def test_the_paper_lexicon_gives_the_released_counts_for_imagenet():
    """Read as the released InterNeg code reads the files: 58,101 nouns and 11,453 adjectives
    once the 1,000 ImageNet class names are dropped (exactly, case-sensitively)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    from pipeline.lexicon import load_lexicon

    lexicon = load_lexicon("paper")
    kept, _ = lexicon.without(IMAGENET_CLASSNAMES)
    assert (int((~kept.is_adjective).sum()), int(kept.is_adjective.sum())) == (58101, 11453)
    assert len(set(lexicon.words)) == len(lexicon.words)  # a word that is both is a noun only
    assert '1530"s' in lexicon.words  # quirks kept as released


def test_class_names_are_dropped_exactly_and_case_sensitively():
    import numpy as np

    from pipeline.lexicon import Lexicon

    lexicon = Lexicon(["apple", "Apple", "granny smith", "Granny Smith"], np.array([False, False, False, True]))
    kept, index = lexicon.without(["Granny Smith", "apple"])
    assert kept.words == ["Apple", "granny smith"] and index.tolist() == [1, 2]


def test_the_wordnet_licence_travels_with_the_paper_lexicon():
    folder = DATA_DIR / "paper_lexicon"
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in (folder / "LICENSE-WordNet-3.0.txt").read_text()
    assert len(list(folder.glob("noun.*.txt"))) == 24 and len(list(folder.glob("adj.*.txt"))) == 3
