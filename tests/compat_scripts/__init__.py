"""iblrig-style scripts written for iblutil 1.20.0, and a loader that runs them on either library.

Each script imports iblutil with exactly one line, ``from iblutil.io import net``.
:func:`load_script` loads it as written (``library="iblutil"``) or with that one
line replaced by ``from trio_rignet.compat import iblutil as net``
(``library="compat"``): nothing else differs.
"""

from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
IBLUTIL_IMPORT = "from iblutil.io import net\n"
COMPAT_IMPORT = "from trio_rignet.compat import iblutil as net\n"
_serial = itertools.count()


def load_script(name: str, library: str) -> ModuleType:
    """Load ``<name>.py`` on ``"iblutil"`` or ``"compat"`` as a fresh module."""
    source = (HERE / f"{name}.py").read_text()
    assert source.count(IBLUTIL_IMPORT) == 1, f"{name}.py must import iblutil on one line"
    rest = source.replace(IBLUTIL_IMPORT, "")
    assert not re.search(r"^\s*(from|import)\s+iblutil", rest, re.M), "one import line only"
    if library == "compat":
        source = source.replace(IBLUTIL_IMPORT, COMPAT_IMPORT)
    elif library != "iblutil":
        raise ValueError(f"library must be 'iblutil' or 'compat', not {library!r}")
    module = ModuleType(f"compat_scripts_{name}_{library}_{next(_serial)}")
    module.__file__ = str(HERE / f"{name}.py")
    sys.modules[module.__name__] = module  # dataclasses and pickling look modules up
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module
