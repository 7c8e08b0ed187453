"""``python -m mamlpp_fast train ...`` / ``python -m mamlpp_fast eval ...``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
