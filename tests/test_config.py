"""Configuration: env + TOML precedence, errors that name the variable, no secrets.

Pure tests: nothing connects, no model loads. ``load_config`` takes the
environment as a dict, so the test process's own variables never leak in.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import racto_nb
from racto_nb.config import ConfigError, RactoConfig, build_retry, load_config, mask_url
from racto_nb.engine.celery_app import build_celery
from racto_nb.kits import OpenAIKit
from racto_nb.kits.factory import build_kit
from racto_nb.models import RetryConfig

SECRET = "sk-proj-THIS-IS-A-SECRET-1234567890"


@pytest.fixture(autouse=True)
def _no_config_file_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # ./racto_nb.toml is read from the working directory: run each test in an empty one.
    monkeypatch.chdir(tmp_path)


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_mean_embedded_local_model() -> None:
    cfg = load_config({})
    assert cfg.broker_url is None and cfg.embedded
    assert cfg.effective_provider == "local"
    assert cfg.api_key_env == "OPENAI_API_KEY"
    assert build_retry(cfg) == RetryConfig()


def test_env_values_are_parsed() -> None:
    cfg = load_config(
        {
            "RACTO_BROKER_URL": "redis://127.0.0.1:6379/1",
            "RACTO_PROVIDER": "openai",
            "RACTO_MODEL": "gpt-4o-mini",
            "RACTO_TIMEOUT_S": "12.5",
            "RACTO_MAX_RETRIES": "5",
            "RACTO_INITIAL_DELAY_S": "0.5",
            "RACTO_BACKOFF_FACTOR": "3",
            "RACTO_MAX_DELAY_S": "60",
            "RACTO_WORKER_NAME": "reviews",
            "RACTO_VISIBILITY_TIMEOUT_S": "7200",
            "RACTO_SYSTEM_PROMPT": "Answer in one word.",
            "RACTO_API_KEY_ENV": "MY_PROVIDER_KEY",
        }
    )
    assert cfg.broker_url == "redis://127.0.0.1:6379/1" and not cfg.embedded
    assert cfg.timeout_s == 12.5 and cfg.worker_name == "reviews" and cfg.visibility_timeout_s == 7200
    assert build_retry(cfg) == RetryConfig(max_retries=5, initial_delay_s=0.5, backoff_factor=3, max_delay_s=60)
    assert cfg.api_key_env == "MY_PROVIDER_KEY"


def test_empty_variables_count_as_unset() -> None:
    assert load_config({"RACTO_BROKER_URL": "", "RACTO_TIMEOUT_S": "  "}) == load_config({})


def test_toml_named_by_racto_config_and_env_wins(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path / "fleet.toml",
        'broker_url = "redis://10.0.0.5:6379/0"\nprovider = "openai"\nmodel = "from-file"\ntimeout_s = 30\n',
    )
    cfg = load_config({"RACTO_CONFIG": str(path), "RACTO_MODEL": "from-env"})
    assert cfg.broker_url == "redis://10.0.0.5:6379/0"  # from the file
    assert cfg.model == "from-env"  # env overrides the file
    assert cfg.timeout_s == 30


def test_default_file_in_working_directory_with_a_table(tmp_path: Path) -> None:
    write_toml(tmp_path / "racto_nb.toml", '[racto_nb]\nworker_name = "docs"\nmax_retries = 1\n')
    cfg = load_config({})
    assert cfg.worker_name == "docs" and build_retry(cfg).max_retries == 1


def test_racto_config_pointing_nowhere_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="RACTO_CONFIG"):
        load_config({"RACTO_CONFIG": str(tmp_path / "missing.toml")})


def test_bad_env_value_names_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"RACTO_TIMEOUT_S": "soon"})
    assert "RACTO_TIMEOUT_S='soon'" in str(info.value)


def test_bad_file_value_names_the_file_and_key(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "racto_nb.toml", "max_retries = -2\n")
    with pytest.raises(ConfigError) as info:
        load_config({})
    assert f"{path}: max_retries" in str(info.value)


def test_unknown_file_key_is_named(tmp_path: Path) -> None:
    write_toml(tmp_path / "racto_nb.toml", 'modle = "typo"\n')
    with pytest.raises(ConfigError, match="'modle'"):
        load_config({})


def test_unknown_provider_is_refused() -> None:
    with pytest.raises(ConfigError, match="RACTO_PROVIDER"):
        load_config({"RACTO_PROVIDER": "anthropic"})


def test_openai_needs_a_model_and_base_url_implies_openai() -> None:
    with pytest.raises(ConfigError, match="RACTO_MODEL"):
        load_config({"RACTO_PROVIDER": "openai"})
    cfg = load_config({"RACTO_BASE_URL": "http://127.0.0.1:8000/v1", "RACTO_MODEL": "qwen"})
    assert cfg.effective_provider == "openai"


def test_a_short_visibility_timeout_alone_is_a_valid_setting() -> None:
    """Retry countdowns are held by a worker that keeps its claim alive: no rule ties them together any more."""
    cfg = load_config({"RACTO_VISIBILITY_TIMEOUT_S": "5"})
    assert cfg.visibility_timeout_s == 5 and build_retry(cfg).max_delay_s == RetryConfig().max_delay_s
    assert load_config({"RACTO_MAX_DELAY_S": "600", "RACTO_VISIBILITY_TIMEOUT_S": "5"}).max_delay_s == 600


def test_broker_must_be_a_url() -> None:
    with pytest.raises(ConfigError, match="RACTO_BROKER_URL='localhost:6379'"):
        load_config({"RACTO_BROKER_URL": "localhost:6379"})


# --------------------------------------------------------------------------- secrets


def test_a_key_in_a_racto_variable_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"RACTO_API_KEY": SECRET})
    assert "RACTO_API_KEY" in str(info.value) and "OPENAI_API_KEY" in str(info.value)
    assert SECRET not in str(info.value)


def test_a_key_pasted_as_the_variable_name_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"RACTO_API_KEY_ENV": SECRET})
    assert "RACTO_API_KEY_ENV" in str(info.value) and SECRET not in str(info.value)


def test_a_key_in_the_file_is_refused_without_echoing_it(tmp_path: Path) -> None:
    write_toml(tmp_path / "racto_nb.toml", f'api_key = "{SECRET}"\n')
    with pytest.raises(ConfigError) as info:
        load_config({})
    assert "api_key" in str(info.value) and SECRET not in str(info.value)


def test_config_never_holds_the_key() -> None:
    env = {
        "RACTO_PROVIDER": "openai",
        "RACTO_MODEL": "gpt-4o-mini",
        "OPENAI_API_KEY": SECRET,
        "RACTO_BROKER_URL": "redis://:brokerpass@10.0.0.5:6379/0",
    }
    cfg = load_config(env)
    assert "api_key" not in RactoConfig.model_fields
    for text in (repr(cfg), str(cfg), cfg.model_dump_json(), str(cfg.describe())):
        assert SECRET not in text
    # The broker password is needed to connect, but never shown.
    assert "brokerpass" not in repr(cfg) and "brokerpass" not in str(cfg.describe())
    assert "redis://:***@10.0.0.5:6379/0" in repr(cfg)


def test_mask_url() -> None:
    assert mask_url("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert mask_url("amqp://guest:guest@localhost:5672//") == "amqp://guest:***@localhost:5672//"
    assert mask_url("redis://h:6379/0") == "redis://h:6379/0"
    assert mask_url(None) is None


# --------------------------------------------------------------------------- building


def test_build_kit_openai_reads_the_key_by_name_only() -> None:
    cfg = load_config(
        {
            "RACTO_PROVIDER": "openai",
            "RACTO_MODEL": "m",
            "RACTO_BASE_URL": "http://127.0.0.1:9/v1",
            "RACTO_API_KEY_ENV": "FLEET_KEY",
            "RACTO_TIMEOUT_S": "7",
            "RACTO_SYSTEM_PROMPT": "Be brief.",
        }
    )
    kit = build_kit(cfg)
    assert isinstance(kit, OpenAIKit)
    assert (kit.model, kit.base_url, kit.api_key_env, kit.timeout_s) == ("m", "http://127.0.0.1:9/v1", "FLEET_KEY", 7)
    assert kit.system_prompt == "Be brief."
    assert kit._client is None  # nothing built or read yet


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="needs racto_nb[local]")
def test_build_kit_default_is_the_local_model_not_loaded() -> None:
    from racto_nb.kits.local import LocalKit

    kit = build_kit(load_config({}))
    assert isinstance(kit, LocalKit) and not kit.loaded


def test_build_celery_redis() -> None:
    cfg = load_config({"RACTO_BROKER_URL": "redis://127.0.0.1:6390/2", "RACTO_VISIBILITY_TIMEOUT_S": "900"})
    conf = build_celery(cfg).conf
    assert conf.broker_url == "redis://127.0.0.1:6390/2"
    assert conf.result_backend == "redis://127.0.0.1:6390/2"  # defaults to the broker
    assert conf.task_serializer == conf.result_serializer == "json"
    assert conf.accept_content == ["json"]
    assert conf.worker_prefetch_multiplier == 1
    assert conf.worker_pool == "threads" and conf.worker_concurrency >= 256  # fit for I/O with no flags
    assert conf.task_default_queue == "racto_nb.default"  # each RACTO_WORKER_NAME its own queue
    assert conf.result_expires >= 7 * 24 * 3600
    assert conf.broker_connection_timeout <= 2 and conf.redis_socket_connect_timeout <= 2
    assert conf.redis_socket_timeout <= 5 and conf.broker_transport_options["socket_timeout"] <= 5


def test_build_celery_amqp_needs_a_result_backend() -> None:
    cfg = load_config({"RACTO_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//"})
    with pytest.raises(ConfigError, match="RACTO_RESULT_BACKEND"):
        build_celery(cfg)
    cfg = load_config({"RACTO_BROKER_URL": "amqp://g:g@h//", "RACTO_RESULT_BACKEND": "redis://h:6379/0"})
    assert build_celery(cfg).conf.result_backend == "redis://h:6379/0"


def test_build_celery_embedded_uses_the_in_process_transport() -> None:
    conf = build_celery(load_config({})).conf
    assert conf.broker_url == "memory://"
    assert conf.broker_transport == "racto_nb.embedded.transport:Transport"
    assert conf.result_backend == "racto_nb.embedded.transport:InProcessBackend"


def test_build_rag_from_an_import_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from racto_nb.kits.factory import build_rag
    from racto_nb.rag import SimpleRAG

    assert build_rag(load_config({})) is None
    monkeypatch.setenv("RACTO_RAG_PATH", str(tmp_path / "chunks.jsonl"))  # read by from_config()
    rag = build_rag(load_config({"RACTO_RAG": "racto_nb.rag:from_config"}))
    assert isinstance(rag, SimpleRAG) and rag.path == tmp_path / "chunks.jsonl"
    assert isinstance(build_rag(load_config({"RACTO_RAG": "racto_nb.rag:SimpleRAG"})), SimpleRAG)
    with pytest.raises(ConfigError, match=r"RACTO_RAG='racto_nb\.rag:nothing_here'"):
        build_rag(load_config({"RACTO_RAG": "racto_nb.rag:nothing_here"}))
    with pytest.raises(ConfigError, match="RACTO_RAG"):
        load_config({"RACTO_RAG": "not an import path"})


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis//host", "is not a URL (scheme://host:port/...): did you mean redis://host?"),
        ("redis:/127.0.0.1:6379", "did you mean redis://127.0.0.1:6379?"),
        ("http://localhost:6379", "is a web address, not a broker"),
        ("redsi://127.0.0.1:6379/0", "unknown scheme 'redsi'; did you mean redis://127.0.0.1:6379/0?"),
        ("amqq://guest:secret@host//", "did you mean amqp://guest:***@host//?"),
    ],
)
def test_broker_url_mistakes_are_one_line_naming_the_url_meant(url: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        racto_nb.connect(url)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert "secret" not in str(info.value)
