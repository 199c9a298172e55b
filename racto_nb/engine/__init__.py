"""The engine: ``RactoCeleryWorker`` and what it stands on (Celery app, publishing, result reads, waiting).

Nothing here knows pandas or IPython. Import from the modules, e.g.
``from racto_nb.engine.worker import RactoCeleryWorker`` (or ``from racto_nb
import RactoCeleryWorker``).
"""
