"""Batches over a DataFrame: rows and templates (pandas only), and ``Batch`` on the engine.

Importing this package imports nothing heavy: ``racto_nb.batch.templates`` and
``racto_nb.batch.rows`` need pandas alone; ``racto_nb.batch.batch`` brings in Celery.
"""
