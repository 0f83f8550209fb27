"""``python -m kiln.serve A.kiln [flags]``: ``kiln serve`` where only the runtime is installed (kiln-runtime)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from kiln.errors import KilnError
from kiln.serve import add_serve_arguments, options_from_args, serve


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``kiln serve``'s flags and serve; errors a user can cause are one line, exit code 2."""
    parser = argparse.ArgumentParser(prog="python -m kiln.serve", description="Serve a .kiln artifact over HTTP.")
    add_serve_arguments(parser)
    parser.add_argument("--threads", type=int, help="threads per model run (default: all cores)")
    args = parser.parse_args(argv)
    try:
        serve(args.artifact, options_from_args(args))
    except KilnError as e:
        print(f"kiln: error: {' '.join(str(e).split())}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
