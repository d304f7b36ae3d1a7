# Copied from KoSimCSE/common/__init__.py (whole file; delete this line to own it)
"""The code every method folder shares: reading data (data.py), encoding (encoding.py), tokenizers
(tokenizer.py), saved model folders (folder.py), STS metrics (sts.py), search and clustering (search.py),
the faiss index (index.py), safe file writes (files.py), model cards (model_card.py), and a training run's
plumbing: its flags and presets (flags.py), what it keeps on disk and resumes from (checkpoint.py), how a
stage trains (stages.py), dev selection and the saved model (dev.py), and the run from start to end (run.py).

KoSimCSE/common/ is the origin. In the other method folders every file here is a whole-file copy whose
first line names its origin; ``python utils/check_copies.py`` checks that they are equal, and ``--fix``
re-syncs them after an edit here. To change a copy for one method only, delete its first line: the file
is then that folder's own and no longer checked.
"""
