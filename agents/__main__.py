"""Entry point of ``python -m agents``."""

import sys

from agents.main import main

sys.exit(main())
