"""The package's shape: light imports, one error root, the public names users and config files rely on."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys

import pytest

import racto_nb.errors as errors
from racto_nb.errors import RactoError


@pytest.mark.parametrize("module", ["racto_nb", "racto_nb.models", "racto_nb.batch.templates", "racto_nb.errors"])
def test_light_modules_do_not_import_celery(module: str) -> None:
    code = f"import sys, {module}; print('celery' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_top_level_names_still_import() -> None:
    code = "from racto_nb import BatchItem, RactoCeleryWorker, RetryConfig, TaskResult, TaskStatus; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "ok"


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("racto_nb.app", "app"),
        ("racto_nb.rag", "from_config"),
        ("racto_nb.api", "run_batch"),
        ("racto_nb.kits", "OpenAIKit"),
        ("racto_nb.kits.local", "LocalKit"),
        ("racto_nb.models", "BatchItem"),
        ("racto_nb.testing", "FakeOpenAIServer"),
        ("racto_nb", "load_ipython_extension"),
    ],
)
def test_public_names_users_rely_on(module: str, name: str) -> None:
    assert getattr(importlib.import_module(module), name) is not None


def test_every_racto_exception_has_the_one_root_and_a_builtin_users_catch() -> None:
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__]
    assert len(classes) >= 10
    for cls in classes:
        assert issubclass(cls, RactoError), cls
    builtins_caught = {
        "ConfigError": ValueError,
        "InvalidArgument": ValueError,
        "TemplateError": ValueError,
        "InvalidSource": TypeError,
        "KitUnavailable": ImportError,
        "ModelNotFound": FileNotFoundError,
        "BrokerUnreachable": ConnectionError,
        "BatchNotFound": LookupError,
        "StillRunning": RuntimeError,
        "Unsupported": RuntimeError,
        "EmbeddedError": RuntimeError,
        "WorkerStartError": RuntimeError,
    }
    for name, builtin in builtins_caught.items():
        assert issubclass(getattr(errors, name), builtin), name
