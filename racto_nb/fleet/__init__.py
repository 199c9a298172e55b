"""Where tasks run: ``connect()``, worker processes, and the fleet's status."""
