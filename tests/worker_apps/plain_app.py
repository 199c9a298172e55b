"""A user's own Celery app with nothing but Celery's defaults (visibility timeout an hour, kombu's 100 s sweep).

Imported by the test process and by its ``celery worker`` processes alike;
broker, backend and the fake server's URL come from the environment.
"""

from __future__ import annotations

import os

from celery import Celery

from racto_nb import RactoCeleryWorker
from racto_nb.kits import OpenAIKit

app = Celery("plain_user_app", broker=os.environ["RACTO_TEST_BROKER"], backend=os.environ["RACTO_TEST_BACKEND"])
worker = RactoCeleryWorker(app, kit=OpenAIKit("plain-model", base_url=os.environ["RACTO_TEST_OPENAI_URL"]))
