"""``python -m offload_engine`` runs the command line."""

import sys

from .cli import main

sys.exit(main())
