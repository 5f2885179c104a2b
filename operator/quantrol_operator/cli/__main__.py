"""`python -m quantrol_operator.cli`: the same as the `quantrol` command."""

import sys

from quantrol_operator.cli import main

sys.exit(main())
