#!/usr/bin/env python
"""A Gradio demo of the models (docs/release.md).
`python app.py --help`; the code lives in citytools/cli/app.py."""

from citytools.cli.app import main

if __name__ == "__main__":
    main()
