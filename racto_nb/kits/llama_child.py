"""The process that runs llama.cpp for :class:`~racto_nb.kits.local.LocalKit`.

Native code (llama.cpp, through ``llama-cpp-python``) runs here and nowhere
else: a segfault, an abort or the OOM killer ends this process, not the
Jupyter kernel or the Celery worker that asked for a completion. The parent
starts it as ``python <this file>`` (no package import: only the standard
library and ``llama_cpp`` are loaded here) and talks to it in JSON lines:

========================  =====================================================
parent → child (stdin)    child → parent (its original stdout)
========================  =====================================================
:class:`LoadRequest`      :class:`LoadReply` (or :class:`ErrorReply`)
:class:`ChatRequest`      :class:`ChatReply` (or :class:`ErrorReply`)
========================  =====================================================

One request at a time, one reply per request. The protocol writes to a
duplicate of the original stdout; file descriptor 1 is pointed at stderr, so
anything llama.cpp prints cannot corrupt a reply. The child exits when its
stdin closes (the parent closed it, or died).

Importing this module (as the parent does, for the message types and
:func:`amx_reasons`) imports no native code.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import IO, Any, Literal, TypedDict

#: /proc/cpuinfo flags of Intel AMX, whose llama.cpp path (``ggml_backend_amx_mul_mat``) is the one that crashes.
AMX_CPU_FLAGS = ("amx_tile", "amx_int8")
#: What ``llama_print_system_info()`` says for a build with the AMX path compiled in.
AMX_BUILD_MARK = "AMX_INT8 = 1"


class LoadRequest(TypedDict):
    op: Literal["load"]
    model_path: str
    n_ctx: int
    n_threads: int | None
    seed: int
    #: ``None``: decide from the CPU and the build (see :func:`amx_reasons`).
    extra_bufts: bool | None


class ChatRequest(TypedDict):
    op: Literal["chat"]
    messages: list[dict[str, str]]
    kwargs: dict[str, Any]


class LoadReply(TypedDict):
    ok: Literal[True]
    load_s: float
    extra_bufts: bool
    why: str
    system_info: str


class ChatReply(TypedDict):
    ok: Literal[True]
    completion: dict[str, Any]


class ErrorReply(TypedDict):
    ok: Literal[False]
    error_type: str
    error: str


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU feature flags Linux reports (empty where there is no /proc/cpuinfo)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def amx_reasons(system_info: str, flags: set[str] | None = None) -> list[str]:
    """Why the AMX path could be taken here: the CPU reports AMX, or the build has it compiled in."""
    found = sorted(set(AMX_CPU_FLAGS) & (cpu_flags() if flags is None else flags))
    reasons = [f"the CPU reports {'/'.join(found)}"] if found else []
    if AMX_BUILD_MARK in system_info:
        reasons.append("llama.cpp was built with AMX")
    return reasons


@contextmanager
def _extra_bufts_off(llama_cpp_module: Any) -> Iterator[None]:
    """``use_extra_bufts = False`` in the params every ``Llama()`` built meanwhile loads with.

    ``Llama.__init__`` does not expose the field; it starts from
    ``llama_cpp.llama_model_default_params()`` and passes the struct to
    ``llama_model_load_from_file``. Wrapping that one function for the
    duration of the ``Llama()`` call (this process builds nothing else)
    keeps the weights in plain CPU buffers instead of llama.cpp's "extra"
    buffer types (AMX and repacked layouts, ``make_cpu_buft_list``), so
    ``ggml_backend_amx_mul_mat`` is never reached.
    """
    original = llama_cpp_module.llama_model_default_params

    def default_params() -> Any:
        params = original()
        params.use_extra_bufts = False
        return params

    llama_cpp_module.llama_model_default_params = default_params
    try:
        yield
    finally:
        llama_cpp_module.llama_model_default_params = original


def _load(request: LoadRequest) -> tuple[Any, LoadReply]:
    import llama_cpp
    import llama_cpp.llama_cpp as low_level

    system_info = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    has_field = any(name == "use_extra_bufts" for name, *_ in low_level.llama_model_params._fields_)
    reasons = amx_reasons(system_info)
    if not has_field:
        extra_bufts, why = True, "on: this llama-cpp-python cannot switch them off"
    elif request["extra_bufts"] is not None:
        extra_bufts, why = request["extra_bufts"], "as configured (extra_bufts=)"
    elif reasons:
        extra_bufts, why = False, f"off: {' and '.join(reasons)}"
    else:
        extra_bufts, why = True, "on: no AMX on this CPU or in this build"

    start = time.perf_counter()
    with nullcontext() if extra_bufts else _extra_bufts_off(low_level):
        llm = llama_cpp.Llama(
            model_path=request["model_path"],
            n_ctx=request["n_ctx"],
            n_threads=request["n_threads"],
            seed=request["seed"],
            verbose=False,
        )
    load_s = time.perf_counter() - start
    if has_field:
        extra_bufts = bool(llm.model_params.use_extra_bufts)
    return llm, {"ok": True, "load_s": load_s, "extra_bufts": extra_bufts, "why": why, "system_info": system_info}


#: Grammars built so far, by their source: a batch has one, and parsing it per call would cost more than a token.
_GRAMMARS: dict[str, Any] = {}


def _grammar(spec: dict[str, str]) -> Any:
    """A ``LlamaGrammar`` from ``{"gbnf": source}`` or ``{"json_schema": schema}`` (cached by its source)."""
    from llama_cpp.llama_grammar import LlamaGrammar

    key = json.dumps(spec, sort_keys=True)
    found = _GRAMMARS.get(key)
    if found is None:
        if "gbnf" in spec:
            found = LlamaGrammar.from_string(spec["gbnf"], verbose=False)
        else:
            found = LlamaGrammar.from_json_schema(spec["json_schema"], verbose=False)
        _GRAMMARS[key] = found
    return found


def _chat(llm: Any, request: ChatRequest) -> ChatReply:
    # Forget the previous prompt: llama.cpp would otherwise reuse the shared prefix from its KV cache,
    # and a prompt evaluated in other batch splits samples other tokens at temperature 0.
    llm.reset()
    kwargs = dict(request["kwargs"])
    if "grammar" in kwargs:
        kwargs["grammar"] = _grammar(kwargs["grammar"])
    completion = llm.create_chat_completion(messages=request["messages"], stream=False, **kwargs)
    return {"ok": True, "completion": dict(completion)}


def serve(requests: IO[str], replies: IO[str]) -> None:
    """Answer requests until ``requests`` ends."""
    llm: Any = None
    for line in requests:
        reply: LoadReply | ChatReply | ErrorReply
        try:
            request = json.loads(line)
            if request["op"] == "load":
                llm, reply = _load(request)
            elif request["op"] == "chat":
                if llm is None:
                    raise RuntimeError("chat before load")
                reply = _chat(llm, request)
            else:
                raise ValueError(f"unknown op {request['op']!r}")
        except Exception as exc:  # reported to the parent, which raises it there
            reply = {"ok": False, "error_type": type(exc).__name__, "error": str(exc)}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def main() -> None:
    # This file's folder (racto_nb/kits, with its openai.py) must not shadow installed packages.
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if p and str(Path(p).resolve()) != here]
    # The protocol keeps the real stdout; fd 1 (C-level printf from llama.cpp, print()) goes to stderr.
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    faulthandler.enable()  # a Python stack in stderr on SIGSEGV/SIGABRT; the signal still ends the process
    serve(sys.stdin, replies)


if __name__ == "__main__":
    main()
