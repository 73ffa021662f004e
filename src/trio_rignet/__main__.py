"""``python -m trio_rignet``: the ``rignet`` command."""

import sys

from .cli import main

sys.exit(main())
