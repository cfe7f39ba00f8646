"""`python -m tlq ...` runs the command line."""

import sys

from tlq.cli import main

sys.exit(main())
