"""The tool-kit's library: what classify.py, train_hf.py, benchmark.py and the other entry scripts at the
repo root share. Split by job (images, discovery, loading, devices, views, models, scorer, results,
transfers, cards, baseline; toolkit for the command lines' plumbing); `remote` is the one way in to
the remote-code files. Nothing here is remote code: the Hub never sees this package."""
