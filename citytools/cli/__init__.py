"""One module per command-line tool; the scripts of the same names at the repo root are their entry
points (`python classify.py ...`)."""
