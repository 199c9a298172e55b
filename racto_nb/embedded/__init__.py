"""The embedded mode: a real Celery worker in a thread of the kernel, on an in-process transport."""
