#!/usr/bin/env python3
"""satellite-client: launch a web app as a batch job behind a Satellite link (placeholder)."""
import sys

__version__ = "0.1.0"


def main(argv=None) -> int:
    print("satellite-client: not built yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
