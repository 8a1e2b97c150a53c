"""`python -m webui` (from the repository root) or `python -m spo_studio.webui`: open the studio page.

From the repository root, `webui` is found as a top-level folder, outside the `spo_studio` package,
so this file imports the installed package by its full name.
"""

import sys

try:
    from spo_studio.webui.cli import main
except ImportError as exc:  # not installed yet
    sys.stderr.write(f"SPO Studio is not installed in this Python ({exc}).\n"
                     "Run `python3 install.py studio` from the repository root: it sets everything up, "
                     "then opens the page.\n")
    sys.exit(2)

if __name__ == "__main__":
    sys.exit(main())
