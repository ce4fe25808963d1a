"""User errors at a command's edge: one clear line on stderr and exit code 2, no traceback.

Shared by the `mmtrain` dispatcher (mmtrain/cli.py) and the `python -m mmtrain.export` style entry
points, so that neither has to import the other (no module imports a CLI module back).
"""

from __future__ import annotations

import sys
from typing import Callable

EXIT_USAGE = 2  # what argparse uses for bad arguments; we use it for every user error


def exit_code(prog: str, main: Callable[[list[str]], int], argv: list[str]) -> int:
    """Run `main(argv)`; a ValueError (a user or data error, by our convention) becomes one line."""
    try:
        return main(argv)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
