"""``iblutil.io.net`` 1.20.0's public API on trio-rignet: change one import.

========================================  ===================================================
iblutil                                   trio-rignet
========================================  ===================================================
``from iblutil.io.net import app, base``  ``from trio_rignet.compat.iblutil import app, base``
``import iblutil.io.net.app as app``      ``import trio_rignet.compat.iblutil.app as app``
``from iblutil.io import net``            ``from trio_rignet.compat import iblutil as net``
========================================  ===================================================

The code that used iblutil then runs unchanged, inside the same asyncio loop,
with trio-rignet's fixes (TCP framing, no missed fast replies, an endpoint
that survives a timeout, every rig signalled at once). The "Change one import"
page of the docs lists every difference.
"""

from . import app, base

__all__ = ["app", "base"]
