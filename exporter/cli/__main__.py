"""`python -m exporter.cli` is the `koedge` command."""

import sys

from exporter.cli import main

sys.exit(main())
