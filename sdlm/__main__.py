"""Run the command line as `python -m sdlm`."""

import sys

from sdlm.cli import main

sys.exit(main())
