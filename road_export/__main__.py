"""`python -m road_export ...`: the `road-export` command line (road_export.app.cli)."""

import sys

from road_export.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
