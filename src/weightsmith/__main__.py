"""``python -m weightsmith``: the command line (weightsmith.cli), also what ``torchrun -m weightsmith`` runs."""

import sys

from weightsmith.cli import main

sys.exit(main())
