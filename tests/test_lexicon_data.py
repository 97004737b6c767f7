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
