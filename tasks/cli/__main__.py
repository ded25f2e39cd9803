"""``python -m datus_queue.tasks.cli``: the same as the ``dq`` console script."""

import sys

from datus_queue.tasks.cli.main import main

sys.exit(main())
