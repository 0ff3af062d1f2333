"""Normalizing heavy channels in a child process, off the event loop's interpreter.

The gateway process runs the event loop and the store's writer under one GIL. Parsing and enriching
a mail takes a third of the event loop's time per mail, so for email the parse and the enrichment
run in a child process with a GIL of its own; small messages (API, chat) stay in the loop, where
the hand-over would cost more than it saves. A normalizer opts in with a true ``offload``
attribute (the email normalizer does) and must pickle (plain data, no closures).

A channel can also have one plain function computed there (:meth:`NormalizeWorker.call`, the
channel context's ``compute``): email reads its trusted Authentication-Results header so, ~500 us
of pure-Python parsing per mail behind a relay.

Parent and child talk over a socket pair in frames (a 4-byte length, then a pickle):
a call id (8 bytes) and ``(NORMALIZE, pickled normalizer, envelope)`` or ``(CALL, function,
arguments)`` one way, ``(call_id, ok, result_or_exception)`` back (the id travels outside the
pickle so that a request the child cannot read is still answered). Envelopes and messages travel
as flat tuples (gateway/offload_wire.py); each side keeps the few normalizers it has seen pickled,
so a normalizer is pickled once, not per mail. The child is one plain loop: read what has
arrived, normalize and enrich (or compute) each, send the answers.

Nothing is acknowledged on the child's word alone: it returns canonical messages, and the pipeline
commits them as before. The child enriches with an :class:`~gateway.enrich.Enricher` built from
the same settings as the pipeline's. When the child dies, the messages it was parsing are
quarantined with their raw bytes (one of them may be what killed it, and parsing it again in the
gateway could kill the gateway); another child starts a second later, and until it runs, messages
are parsed in the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import multiprocessing
import multiprocessing.process
import pickle
import signal
import socket
import struct
from collections.abc import Callable
from typing import Any, TypeVar, cast

from core.errors import NormalizationError
from core.model import CanonicalMessage, RawEnvelope
from core.settings import Settings
from gateway.enrich import Enricher
from gateway.offload_wire import decode_envelope, decode_message, encode_envelope, encode_message
from normalizers.base import Normalizer
from normalizers.content import normalized

logger = logging.getLogger(__name__)

T = TypeVar("T")

_HEADER = struct.Struct("!I")
# What a request asks of the child.
_NORMALIZE = 0
_CALL = 1
_CALL_ID = struct.Struct("!Q")
_READY_TIMEOUT = 30.0
_RESTART_DELAY = 1.0
# Normalizers kept pickled (parent) and unpickled (child): one per channel configuration, and the
# odd per-request one (normalizers.api); the table is emptied when it fills.
_NORMALIZERS_KEPT = 64


class ComputeLost(RuntimeError):
    """The normalizer process died while computing a call (running it again in the gateway could
    take the gateway down the same way)."""


def offloadable(normalize: Normalizer) -> bool:
    """Whether ``normalize`` asks to run in the worker (it says so with ``offload = True``)."""
    return bool(getattr(normalize, "offload", False))


class _Frames(asyncio.Protocol):
    """Length-prefixed frames; the frames of one loop iteration leave in one write."""

    def __init__(self, on_frame: Callable[[bytes], None], on_lost: Callable[[], None]) -> None:
        self._on_frame = on_frame
        self._on_lost = on_lost
        self._buffer = bytearray()
        self._outgoing: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        for frame in _take_frames(self._buffer):
            self._on_frame(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._on_lost()

    def send(self, payload: bytes) -> bool:
        if self.transport is None or self.transport.is_closing():
            return False
        if not self._outgoing:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outgoing += (_HEADER.pack(len(payload)), payload)
        return True

    def _flush(self) -> None:
        outgoing, self._outgoing = self._outgoing, []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(outgoing))


def _take_frames(buffer: bytearray) -> list[bytes]:
    """Remove and return the complete frames at the start of ``buffer``."""
    frames = []
    start = 0
    while len(buffer) - start >= _HEADER.size:
        (size,) = _HEADER.unpack_from(buffer, start)
        end = start + _HEADER.size + size
        if len(buffer) < end:
            break
        frames.append(bytes(buffer[start + _HEADER.size : end]))
        start = end
    del buffer[:start]
    return frames


class NormalizeWorker:
    """Parent side: sends envelopes to the child, restarts it when it dies."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._ids = itertools.count(1)
        self._calls: dict[int, asyncio.Future[list[Any]]] = {}
        self._frames: _Frames | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._ready = asyncio.Event()
        self._closing = False
        self._restart: asyncio.Task[None] | None = None
        self._normalizers: dict[Normalizer, bytes] = {}
        self._computing: set[int] = set()  # the ids of calls (not normalizations) in the child

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def start(self) -> None:
        try:
            await self._start_child()
        except Exception:
            # Parsing in the loop works too, only slower: a failed start must not stop the gateway.
            logger.exception("normalizer process did not start; parsing in the gateway process")
            self._restart_later()

    async def close(self) -> None:
        self._closing = True
        if self._calls:  # the listeners have stopped; let what they handed over finish
            await asyncio.wait(list(self._calls.values()), timeout=10.0)
        if self._restart is not None:
            self._restart.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._restart
        process, frames = self._process, self._frames
        if frames is not None and frames.transport is not None:
            frames.transport.close()  # the child reads end-of-file and exits
        if process is not None:
            await asyncio.to_thread(process.join, 5.0)
            if process.is_alive():
                process.kill()
                await asyncio.to_thread(process.join)

    async def run(self, normalize: Normalizer, envelope: RawEnvelope) -> list[CanonicalMessage] | None:
        """``normalize(envelope)``, each message finished and enriched, computed in the child;
        ``None`` when the child is not running or the envelope does not pickle: then the caller
        parses it itself.

        Raises what the normalizer raises (InvalidInput, NormalizationError), and NormalizationError
        when the child dies while parsing this envelope.
        """
        frames = self._frames
        if frames is None or not self._ready.is_set():
            return None
        call_id = next(self._ids)
        try:
            request = (_NORMALIZE, self._pickled(normalize), encode_envelope(envelope))
            payload = _CALL_ID.pack(call_id) + _dumps(request)
        except (pickle.PicklingError, TypeError, AttributeError):
            return None
        if not frames.send(payload):
            return None
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = future
        return [decode_message(message) for message in await future]

    async def call(self, fn: Callable[..., T], *args: Any) -> tuple[bool, T | None]:
        """``(True, fn(*args))`` computed in the child; ``(False, None)`` when the child is not
        running or the call does not pickle: then the caller computes it itself.

        ``fn`` must be importable by name (a module-level function) and pure. Raises what ``fn``
        raises, and :class:`ComputeLost` when the child dies while computing it.
        """
        frames = self._frames
        if frames is None or not self._ready.is_set():
            return False, None
        call_id = next(self._ids)
        try:
            payload = _CALL_ID.pack(call_id) + _dumps((_CALL, fn, args))
        except (pickle.PicklingError, TypeError, AttributeError):
            return False, None
        if not frames.send(payload):
            return False, None
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = future
        self._computing.add(call_id)
        try:
            return True, await future
        finally:
            self._computing.discard(call_id)

    def _pickled(self, normalize: Normalizer) -> bytes:
        """``normalize`` pickled, remembered for the next call with an equal normalizer."""
        try:
            pickled = self._normalizers.get(normalize)
        except TypeError:  # not hashable: pickled each time
            return _dumps(normalize)
        if pickled is None:
            pickled = _dumps(normalize)
            if len(self._normalizers) >= _NORMALIZERS_KEPT:
                self._normalizers.clear()
            self._normalizers[normalize] = pickled
        return pickled

    # -- the child's life ----------------------------------------------------------------------

    async def _start_child(self) -> None:
        parent_sock, child_sock = socket.socketpair()
        process = multiprocessing.get_context("spawn").Process(
            target=child_main, args=(self._settings, child_sock), name="ticketgate-normalize", daemon=True
        )
        # Spawning starts an interpreter and pickles the settings: keep it off the event loop.
        await asyncio.to_thread(process.start)
        child_sock.close()
        self._ready.clear()
        loop = asyncio.get_running_loop()
        _, frames = await loop.create_unix_connection(
            lambda: _Frames(self._on_frame, self._on_lost), sock=parent_sock
        )
        self._frames, self._process = frames, process
        try:
            async with asyncio.timeout(_READY_TIMEOUT):
                await self._ready.wait()
        except TimeoutError:
            process.kill()
            raise
        logger.info("normalizer process %s running", process.pid)

    def _on_frame(self, payload: bytes) -> None:
        call_id, ok, value = pickle.loads(payload)  # noqa: S301 - from our own child
        if call_id == 0:
            self._ready.set()
            return
        future = self._calls.pop(call_id, None)
        if future is None or future.done():
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def _on_lost(self) -> None:
        self._ready.clear()
        self._frames = None
        calls, self._calls = self._calls, {}
        for call_id, future in calls.items():
            if not future.done():
                future.set_exception(
                    ComputeLost("the normalizer process died while computing this call")
                    if call_id in self._computing
                    else NormalizationError("the normalizer process died while parsing this message")
                )
        if calls:
            logger.error("normalizer process died with %d messages in it; they are quarantined", len(calls))
        if not self._closing:
            self._restart_later()

    def _restart_later(self) -> None:
        if self._restart is None or self._restart.done():
            self._restart = asyncio.get_running_loop().create_task(self._restart_child())

    async def _restart_child(self) -> None:
        process = self._process
        if process is not None:
            await asyncio.to_thread(process.join)
            logger.error("normalizer process exited (code %s); starting another", process.exitcode)
        while not self._closing:
            await asyncio.sleep(_RESTART_DELAY)
            try:
                await self._start_child()
            except Exception:
                logger.exception("normalizer process did not start; parsing in the gateway process")
            else:
                return


# -- child side --------------------------------------------------------------------------------


def _portable_error(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling as the same type; else a NormalizationError naming it (the
    pipeline quarantines either way, as it does for an unexpected error of a normalizer)."""
    try:
        copy = pickle.loads(pickle.dumps(exc))  # noqa: S301 - our own bytes
    except Exception:
        copy = None
    if type(copy) is type(exc):
        return exc
    return NormalizationError(f"normalizer error: {type(exc).__name__}: {exc}")


def child_main(settings: Settings, sock: socket.socket) -> None:
    """Entry point of the normalizer process: answer frames until the parent closes the socket."""
    from gateway.logs import configure_logging
    from gateway.process import name_process

    name_process("tg-normalize")
    # The parent decides when we stop (it closes the socket); a terminal's Ctrl-C reaches us too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(settings.log)
    enrich = Enricher.from_settings(settings).enrich
    normalizers: dict[bytes, Normalizer] = {}
    gc.collect()
    gc.freeze()
    sock.setblocking(True)
    sock.sendall(_frame((0, True, None)))
    buffer = bytearray()
    # Received into one buffer: recv(1 MB) allocates and frees a megabyte per call, ~20 us each.
    chunk = memoryview(bytearray(1 << 20))
    with sock:
        while received := sock.recv_into(chunk):
            buffer += chunk[:received]
            answers = [_answer(frame, enrich, normalizers) for frame in _take_frames(buffer)]
            if answers:
                sock.sendall(b"".join(answers))


def _answer(
    frame: bytes,
    enrich: Callable[[CanonicalMessage], CanonicalMessage],
    normalizers: dict[bytes, Normalizer],
) -> bytes:
    """The answer frame to one request; ``normalizers``: those seen so far, by their pickle."""
    (call_id,) = _CALL_ID.unpack_from(frame)
    try:
        kind, first, second = pickle.loads(memoryview(frame)[_CALL_ID.size :])  # noqa: S301 - from our parent
    except Exception as exc:
        error = NormalizationError(f"the normalizer process could not read it: {exc}")
        return _frame((call_id, False, error))
    if kind == _CALL:
        try:
            result = first(*second)
        except Exception as exc:
            return _frame((call_id, False, _portable_error(exc)))
        try:
            return _frame((call_id, True, result))
        except Exception as exc:
            return _frame((call_id, False, _portable_error(exc)))
    try:
        pickled, encoded = first, second
        normalize = normalizers.get(pickled)
        if normalize is None:
            normalize = pickle.loads(pickled)  # noqa: S301 - from our parent
            if len(normalizers) >= _NORMALIZERS_KEPT:
                normalizers.clear()
            normalizers[pickled] = normalize
        envelope = decode_envelope(encoded)
    except Exception as exc:
        # Answered, not fatal: a request that kills the child would kill each one after it too.
        error = NormalizationError(f"the normalizer process could not read it: {exc}")
        return _frame((call_id, False, error))
    try:
        messages = [encode_message(enrich(message)) for message in normalized(normalize, envelope)]
    except Exception as exc:
        return _frame((call_id, False, _portable_error(exc)))
    try:
        return _frame((call_id, True, messages))
    except Exception as exc:  # a message that does not pickle: quarantined, as the parent cannot have it
        return _frame((call_id, False, _portable_error(exc)))


def _dumps(value: Any) -> bytes:
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def _frame(value: Any) -> bytes:
    payload = _dumps(value)
    return _HEADER.pack(len(payload)) + payload
