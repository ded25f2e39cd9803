"""``python -m tasks.cli``: the same as the ``dq`` console script."""

import sys

from tasks.cli.main import main

sys.exit(main())
