"""Clients of the engine core: in-process, and over ZMQ to a separate process.

- ``InprocClient`` runs ``EngineCore.step()`` in the caller's process (offline use).
- ``MPClient`` starts the engine core in its own process (``core_proc``), binds the
  ipc:// sockets, waits for the core's ready report, and tracks liveness from the
  heartbeat. ``AsyncMPClient`` reads outputs from an asyncio task (the API server).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import shutil
import tempfile
import time
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from pagedserve import envs
from pagedserve.config import EngineConfig, KVCacheConfig
from pagedserve.engine.core_proc import run_engine_core
from pagedserve.engine.messages import (
    EngineCoreHeartbeat,
    EngineCoreOutputs,
    EngineCoreReadyInfo,
    EngineCoreRequest,
    InputKind,
    OutputKind,
    SchedulerStats,
    UtilityResult,
)

logger = logging.getLogger(__name__)

# How often the output reader checks the core process while no message arrives.
_POLL_INTERVAL_S = 0.25


class EngineDeadError(RuntimeError):
    """The engine core process died or failed; no request can be served any more."""


class EngineStartupError(RuntimeError):
    """The engine core failed while loading (bad model, out of memory, ...)."""


class InprocClient:
    """The engine core in this process: ``get_output()`` runs one step."""

    def __init__(self, engine_config: EngineConfig) -> None:
        from pagedserve.engine.core import EngineCore

        self.engine_core = EngineCore(engine_config)
        self.last_stats: SchedulerStats | None = None

    def add_request(self, request: EngineCoreRequest) -> None:
        self.engine_core.add_request(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids:
            self.engine_core.abort_requests(request_ids)

    def get_output(self) -> EngineCoreOutputs:
        outputs = self.engine_core.step()
        self.last_stats = outputs.scheduler_stats
        return outputs

    def get_stats(self) -> SchedulerStats:
        return self.engine_core.make_stats(0)

    @property
    def kv_cache_config(self) -> KVCacheConfig:
        return self.engine_core.kv_cache_config

    @property
    def quantization_info(self) -> str:
        return self.engine_core.quantization_info

    def reset_prefix_cache(self) -> bool:
        return self.engine_core.reset_prefix_cache()

    def shutdown(self) -> None:
        pass


class MPClient:
    """Starts the engine core in its own process and talks to it over ZMQ.

    The front end binds both sockets (PUSH for input, PULL for output) before the
    child starts; the child connects. Subclasses read the output socket (handling
    heartbeats and utility answers on the way) and raise ``EngineDeadError`` when the
    core process dies or reports a fatal error.
    """

    def __init__(
        self,
        engine_config: EngineConfig,
        log_level: int | None = None,
        heartbeat_interval: float | None = None,
        heartbeat_timeout: float | None = None,
    ) -> None:
        self.engine_config = engine_config
        # Seconds between heartbeats from the engine core; without any message from the
        # core for heartbeat_timeout seconds it counts as stalled (/health 503).
        self.heartbeat_interval = (
            envs.PAGEDSERVE_ENGINE_HEARTBEAT_INTERVAL
            if heartbeat_interval is None else heartbeat_interval
        )
        self.heartbeat_timeout = (
            envs.PAGEDSERVE_ENGINE_HEARTBEAT_TIMEOUT
            if heartbeat_timeout is None else heartbeat_timeout
        )
        self._tmpdir = tempfile.mkdtemp(prefix="pagedserve-ipc-")
        self.input_address = f"ipc://{self._tmpdir}/input"
        self.output_address = f"ipc://{self._tmpdir}/output"
        self.encoder = msgspec.msgpack.Encoder()
        self.outputs_decoder = msgspec.msgpack.Decoder(EngineCoreOutputs)
        self.heartbeat_decoder = msgspec.msgpack.Decoder(EngineCoreHeartbeat)
        self.utility_decoder = msgspec.msgpack.Decoder(UtilityResult)
        self.last_stats: SchedulerStats | None = None
        self.last_message_time = time.monotonic()
        self.dead_reason: str | None = None
        self._closed = False
        self._utility_ids = itertools.count()

        self._sync_context = zmq.Context(io_threads=1)
        self.input_socket = self._sync_context.socket(zmq.PUSH)
        self.input_socket.setsockopt(zmq.SNDHWM, 0)  # never block the event loop on send
        self.input_socket.setsockopt(zmq.LINGER, 0)
        self.input_socket.bind(self.input_address)
        self.output_socket = self._make_output_socket()

        ctx = multiprocessing.get_context("spawn")
        reader, writer = ctx.Pipe(duplex=False)
        if log_level is None:
            log_level = logging.getLogger("pagedserve").getEffectiveLevel()
        self.process = ctx.Process(
            target=run_engine_core,
            name="PagedServeEngineCore",
            kwargs={
                "engine_config": engine_config,
                "input_address": self.input_address,
                "output_address": self.output_address,
                "ready_pipe": writer,
                "heartbeat_interval": self.heartbeat_interval,
                "log_level": log_level,
            },
            daemon=True,
        )
        try:
            self.process.start()
            writer.close()
            self.ready_info = self._wait_ready(reader)
        except BaseException:
            self.shutdown()
            raise
        finally:
            reader.close()
        self.last_message_time = time.monotonic()

    def _make_output_socket(self) -> Any:
        socket = self._sync_context.socket(zmq.PULL)
        socket.setsockopt(zmq.RCVHWM, 0)
        socket.setsockopt(zmq.LINGER, 0)
        socket.bind(self.output_address)
        return socket

    def _wait_ready(self, reader: Any) -> EngineCoreReadyInfo:
        # How long to wait for the engine core to load the model and report ready.
        ready_timeout = envs.PAGEDSERVE_ENGINE_READY_TIMEOUT
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if reader.poll(0.2):
                try:
                    status, payload = reader.recv()
                except EOFError:
                    break
                if status == "ready":
                    info = EngineCoreReadyInfo(**payload)
                    logger.info("engine core ready (pid %d, %.1f s)", info.pid, info.load_seconds)
                    return info
                raise EngineStartupError(f"the engine core failed to start:\n{payload}")
            if not self.process.is_alive():
                break
        self.process.join(1.0)
        if self.process.is_alive():
            raise EngineStartupError(
                f"the engine core did not report ready within {ready_timeout:.0f} s"
            )
        raise EngineStartupError(
            f"the engine core process exited with code {self.process.exitcode} during start-up"
        )

    # ---------------------------------------------------------------- requests
    def add_request(self, request: EngineCoreRequest) -> None:
        self._send(InputKind.ADD, self.encoder.encode(request))

    def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids:
            self._send(InputKind.ABORT, self.encoder.encode(list(request_ids)))

    def _send(self, kind: InputKind, payload: bytes) -> None:
        if self._closed or self.dead_reason is not None:
            if kind == InputKind.ABORT:
                return  # nothing left to abort
            raise EngineDeadError(self.dead_reason or "the engine core is shut down")
        try:
            # Never blocks: no send HWM, and NOBLOCK when the core has gone (no peer).
            self.input_socket.send_multipart((kind.value, payload), flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            if kind == InputKind.ABORT:
                return
            raise self._mark_dead("the engine core is not connected") from None

    # ------------------------------------------------------------------ liveness
    @property
    def engine_pid(self) -> int | None:
        return self.process.pid

    def seconds_since_heartbeat(self) -> float:
        return time.monotonic() - self.last_message_time

    def is_alive(self) -> bool:
        """Process alive and a message (output or heartbeat) seen within the timeout."""
        return (
            self.dead_reason is None
            and not self._closed
            and self.process.is_alive()
            and self.seconds_since_heartbeat() < self.heartbeat_timeout
        )

    def _mark_dead(self, reason: str) -> EngineDeadError:
        if self.dead_reason is None:
            self.dead_reason = reason
            logger.error("engine core is dead: %s", reason)
        return EngineDeadError(self.dead_reason)

    def is_process_alive(self) -> bool:
        """The engine-core process exists (it may still be stalled: see ``is_alive``)."""
        return self.process.is_alive()

    def _check_process(self) -> None:
        if not self.process.is_alive():
            raise self._mark_dead(
                f"the engine core process (pid {self.process.pid}) exited with code "
                f"{self.process.exitcode}"
            )

    # ------------------------------------------------------------------ outputs
    def _handle_frames(self, frames: list[Any]) -> EngineCoreOutputs | None:
        """Decode one message; returns outputs, or None for heartbeats/utility answers."""
        self.last_message_time = time.monotonic()
        kind = bytes(frames[0])
        payload = frames[1] if len(frames) > 1 else b""
        if kind == OutputKind.OUTPUTS.value:
            outputs = self.outputs_decoder.decode(payload)
            if outputs.scheduler_stats is not None:
                self.last_stats = outputs.scheduler_stats
            return outputs
        if kind == OutputKind.HEARTBEAT.value:
            self.last_stats = self.heartbeat_decoder.decode(payload).scheduler_stats
            return None
        if kind == OutputKind.UTILITY.value:
            self._on_utility_result(self.utility_decoder.decode(payload))
            return None
        if kind == OutputKind.ERROR.value:
            raise self._mark_dead("the engine core failed:\n" + bytes(payload).decode(errors="replace"))
        raise self._mark_dead(f"unknown message kind {kind!r} from the engine core")

    def _on_utility_result(self, result: UtilityResult) -> None:
        logger.debug("utility result without a waiter: %s", result)

    # ------------------------------------------------------------------ shutdown
    def shutdown(self, timeout: float = 5.0) -> None:
        """Ask the core to exit, then terminate/kill it if it does not; remove the sockets."""
        if self._closed:
            return
        process = getattr(self, "process", None)
        if process is not None and process.is_alive() and self.dead_reason is None:
            try:
                self.input_socket.send_multipart((InputKind.SHUTDOWN.value, b""), flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # the core has gone already
        self._closed = True
        if process is not None and process.pid is not None:
            process.join(timeout)
            if process.is_alive():
                # The core ignores SIGTERM (see core_proc): kill it.
                logger.warning("engine core did not exit in %.0f s; killing it", timeout)
                process.kill()
                process.join(5.0)
        for socket in (self.input_socket, self.output_socket):
            socket.close(linger=0)
        self._close_contexts()
        shutil.rmtree(self._tmpdir, ignore_errors=True)

    def _close_contexts(self) -> None:
        self._sync_context.term()


class AsyncMPClient(MPClient):
    """MPClient whose output socket is read from the asyncio event loop."""

    def _make_output_socket(self) -> Any:
        self._async_context = zmq.asyncio.Context(io_threads=1)
        socket = self._async_context.socket(zmq.PULL)
        socket.setsockopt(zmq.RCVHWM, 0)
        socket.setsockopt(zmq.LINGER, 0)
        socket.bind(self.output_address)
        self._utility_waiters: dict[int, asyncio.Future[Any]] = {}
        return socket

    async def get_output_async(self) -> EngineCoreOutputs:
        """Wait for the next step's outputs; raises EngineDeadError when the core dies."""
        while True:
            if self.dead_reason is not None:
                raise EngineDeadError(self.dead_reason)
            if self._closed:
                raise EngineDeadError("the engine core is shut down")
            if await self.output_socket.poll(int(_POLL_INTERVAL_S * 1000)):
                frames = await self.output_socket.recv_multipart()
                outputs = self._handle_frames(frames)
                if outputs is not None:
                    return outputs
            else:
                self._check_process()

    async def call_utility_async(self, method: str, *args: Any, timeout: float = 30.0) -> Any:
        """Call an allow-listed method on the engine core and wait for its answer."""
        call_id = next(self._utility_ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._utility_waiters[call_id] = future
        try:
            self._send(InputKind.UTILITY, self.encoder.encode((call_id, method, list(args))))
            return await asyncio.wait_for(future, timeout)
        finally:
            self._utility_waiters.pop(call_id, None)

    def _on_utility_result(self, result: UtilityResult) -> None:
        future = self._utility_waiters.get(result.call_id)
        if future is None or future.done():
            return
        if result.error is not None:
            future.set_exception(RuntimeError(result.error))
        else:
            future.set_result(result.result)

    def _mark_dead(self, reason: str) -> EngineDeadError:
        error = super()._mark_dead(reason)
        for future in getattr(self, "_utility_waiters", {}).values():
            if not future.done():
                future.set_exception(EngineDeadError(reason))
        return error

    def _close_contexts(self) -> None:
        self._sync_context.term()
        self._async_context.term()
