"""What a batch costs and how fast it may spend: prices, the pay-once ledger, the fleet's rate governor, estimates.

Nothing here knows Celery: the engine hands these objects a Redis client (or
uses their in-process twins in the embedded mode) and calls them around each
model call.
"""
