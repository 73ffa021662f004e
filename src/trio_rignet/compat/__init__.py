"""Drop-in APIs of other libraries, running on trio-rignet.

- :mod:`trio_rignet.compat.iblutil`: ``iblutil.io.net`` 1.20.0 (``app`` and
  ``base``), so that code written for iblutil runs by changing its import line.
"""
