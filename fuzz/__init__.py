"""Coverage-guided fuzzing of every reader a user's file reaches (see ``fuzz/README`` in README.md's
safety section): :mod:`fuzz.targets` (harnesses), ``make_corpus.py`` (seeds), ``run.py`` (campaigns)."""
