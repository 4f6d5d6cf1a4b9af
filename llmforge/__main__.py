"""``python -m llmforge``: the same as the ``llmforge`` command."""

import sys

from llmforge.flows.cli import main

sys.exit(main())
