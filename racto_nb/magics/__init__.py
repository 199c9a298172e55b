"""The IPython magics: declarations, what each does (commands), and line parsing, in three modules.

:mod:`.declarations` declares arguments only, :mod:`.commands` calls
:mod:`racto_nb.api` and displays, :mod:`.parsing` reads the line and turns
mistakes into one-line errors.

``%load_ext racto_nb`` calls :func:`load_ipython_extension`.
"""

from racto_nb.magics.declarations import RactoMagics, load_ipython_extension, unload_ipython_extension

__all__ = ["RactoMagics", "load_ipython_extension", "unload_ipython_extension"]
