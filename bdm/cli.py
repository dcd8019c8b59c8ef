"""What every `python -m bdm.<tool>` shares: user errors become one clear line and exit status 2,
not a traceback."""
from __future__ import annotations

import sys

from .formats.files import FormatError

USER_ERRORS = (FormatError, FileNotFoundError, ValueError)


def run(main, argv=None) -> int:
    """Run `main(argv)`; a bad file or bad input prints `error: …` on stderr and returns 2."""
    try:
        return main(argv) or 0
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
