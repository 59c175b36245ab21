"""Fuzzing of every reader a user's file reaches (README.md, safety section): :mod:`fuzz.targets`
(the harnesses), ``make_corpus.py`` (seeds from the tests' builders), ``run.py`` (campaigns)."""
