"""What racto_nb needs from the kernel: displaying, knowing it is a kernel, and threads that draw.

Background threads and ipykernel 7
----------------------------------
The engine may call ``update`` from a polling thread while the user keeps
working in other cells. What we found in ipykernel 7.4:

* ``Widget.send_state`` ends in ``ipykernel.comm.BaseComm.publish_msg``, which
  stamps the message with ``kernel.get_parent()``. That reads a ``ContextVar``;
  a thread started with ``threading.Thread`` has an empty context, so the
  lookup falls back to the context saved by the *latest* ``set_parent``, i.e.
  whatever cell ran last, or the ``comm_msg`` of the last button click. That
  is ipywidgets #4020 (7.0.0 also crashed in a thread hook, #4001; 7.0.1 dropped
  the hook, ipykernel #1451).
* Front-ends (JupyterLab's ``KernelConnection``, classic Notebook) dispatch
  ``comm_msg`` by ``comm_id`` whatever its parent header says, so state updates
  from a thread arrive either way. The parent matters for the ``Output``
  widget's capture (matched on ``msg_id``) and for ``print``/``display`` from
  the thread, which land in whichever cell ran last.

So the views use no ``Output`` widget and print nothing from threads; they set
widget traits only. On top of that, ``CellContext`` copies the contextvars of
the cell that built (or displayed) the view and runs writes from any other
thread inside a copy of them. The kernel's shell parent and the parents of the
display publisher and streams are all ``ContextVar``s in ipykernel 7, so every
message the update sends carries the originating cell's header, with no
private API and without ``set_parent`` from a thread, which would move the
global fallback for every other thread. The copy is made per call because a
``Context`` cannot be entered by two threads at once.
"""

from __future__ import annotations

import contextvars
import importlib.util
import threading
from collections.abc import Callable

__all__ = ["CellContext", "ipython_display", "markdown", "widgets_available"]


def ipython_display(obj: object) -> None:
    """``IPython.display.display``, typed (IPython leaves it unannotated) and imported late."""
    from IPython.display import display

    show: Callable[[object], object] = display
    show(obj)


def markdown(text: str) -> object:
    """An IPython ``Markdown`` display object for ``text``."""
    from IPython.core import display as ipython_core_display

    make: Callable[[str], object] = ipython_core_display.Markdown  # untyped in IPython
    return make(text)


class CellContext:
    """The contextvars of the cell that owns a view, replayed in threads (see module docstring)."""

    def __init__(self) -> None:
        self._ctx: contextvars.Context | None = None
        self._owner = 0
        self.capture()

    def capture(self) -> None:
        """Remember the calling thread's context; called where a cell is known to be running."""
        self._ctx = contextvars.copy_context()
        self._owner = threading.get_ident()

    def release(self) -> None:
        """Drop the snapshot: it pins the cell's parent header and every other var of that cell."""
        self._ctx = None

    def run(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` so its widget messages carry the owning cell's parent header."""
        ctx = self._ctx
        if ctx is None or threading.get_ident() == self._owner:
            fn()
        else:
            ctx.copy().run(fn)


def widgets_available() -> bool:
    """``True`` in a Jupyter kernel (a ``ZMQInteractiveShell`` or subclass, e.g. Colab's) with
    ipywidgets importable: the only place a widget view renders as more than a repr."""
    try:
        from IPython.core import getipython
    except ImportError:
        return False
    get_shell: Callable[[], object] = getipython.get_ipython  # IPython leaves it unannotated
    shell = get_shell()
    if shell is None or not any(cls.__name__ == "ZMQInteractiveShell" for cls in type(shell).__mro__):
        return False
    return importlib.util.find_spec("ipywidgets") is not None
