"""The engine-core process: EngineCore behind two ZMQ sockets.

The API server process owns the sockets' addresses (ipc:// in a temp dir) and binds
them; this process connects, loads the model, reports its start-up info through a
pipe, and runs a busy loop:

- drain the input socket (new requests, aborts, utility calls, shutdown),
- ``step()`` while there is work, blocking on the input socket when idle,
- push every step's ``EngineCoreOutputs`` to the output socket,
- push a heartbeat at a fixed interval (idle or between steps), so the front end
  can tell a dead or stalled core from a busy one.

A fatal error is reported on the output socket, then the process exits non-zero.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import traceback
from typing import Any

import msgspec
import zmq

from pagedserve.engine.messages import (
    EngineCoreHeartbeat,
    EngineCoreReadyInfo,
    EngineCoreRequest,
    InputKind,
    OutputKind,
    UtilityResult,
)

logger = logging.getLogger(__name__)


# Methods the front end may call on the engine core by name (with msgpack-able args/results).
_UTILITY_METHODS = ("reset_prefix_cache",)


class EngineCoreProc:
    """Runs an EngineCore in this process, fed and drained over ZMQ."""

    def __init__(
        self,
        engine_config: Any,
        input_address: str,
        output_address: str,
        heartbeat_interval: float,
    ) -> None:
        from pagedserve.engine.core import EngineCore

        self.heartbeat_interval = heartbeat_interval
        self.parent_pid = os.getppid()
        self.context = zmq.Context(io_threads=1)
        # Connect the output socket first, so a start-up failure can still be reported.
        self.output_socket = self.context.socket(zmq.PUSH)
        self.output_socket.setsockopt(zmq.SNDHWM, 0)
        self.output_socket.setsockopt(zmq.LINGER, 2000)
        self.output_socket.connect(output_address)
        self.input_socket = self.context.socket(zmq.PULL)
        self.input_socket.setsockopt(zmq.RCVHWM, 0)
        self.input_socket.connect(input_address)
        self.poller = zmq.Poller()
        self.poller.register(self.input_socket, zmq.POLLIN)

        self.encoder = msgspec.msgpack.Encoder()
        self.request_decoder = msgspec.msgpack.Decoder(EngineCoreRequest)
        self.abort_decoder = msgspec.msgpack.Decoder(list[str])
        self.utility_decoder = msgspec.msgpack.Decoder(tuple[int, str, list[Any]])

        self.engine_core = EngineCore(engine_config)
        self.last_sent = 0.0
        self.should_exit = False

    def ready_info(self) -> EngineCoreReadyInfo:
        from pagedserve import platform

        kv_cache_config = self.engine_core.kv_cache_config
        return EngineCoreReadyInfo(
            pid=os.getpid(),
            load_seconds=self.engine_core.load_seconds,
            num_blocks=kv_cache_config.num_blocks,
            block_size=kv_cache_config.block_size,
            kv_cache_memory_bytes=kv_cache_config.kv_cache_memory_bytes,
            num_threads=platform.num_threads(),
            isa=platform.cpu_isa(),
            device=str(platform.device()),
            step_budget=self.engine_core.describe_step_budget(),
            quantization=self.engine_core.quantization_info,
        )

    # ------------------------------------------------------------------- loop
    def run_busy_loop(self) -> None:
        """Step while there is work; block on the input socket (with heartbeats) when idle."""
        core = self.engine_core
        while not self.should_exit:
            self._process_input(block=not core.has_work())
            if self.should_exit:
                break
            if core.has_work():
                outputs = core.step()
                self._send(OutputKind.OUTPUTS, self.encoder.encode(outputs))
            self._maybe_heartbeat()

    def _process_input(self, block: bool) -> None:
        if block:
            timeout_ms = max(
                0, int((self.last_sent + self.heartbeat_interval - time.monotonic()) * 1000)
            )
            if not self.poller.poll(timeout_ms):
                return
        while True:
            try:
                frames = self.input_socket.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._handle_message(bytes(frames[0].buffer), frames[1].buffer if len(frames) > 1 else b"")

    def _handle_message(self, kind: bytes, payload: Any) -> None:
        core = self.engine_core
        if kind == InputKind.ADD.value:
            request = self.request_decoder.decode(payload)
            try:
                core.add_request(request)
            except ValueError as exc:
                # A bad request fails alone; the others are not disturbed.
                logger.warning("rejected request %s: %s", request.request_id, exc)
                core.reject_request(request.request_id, str(exc))
        elif kind == InputKind.ABORT.value:
            core.abort_requests(self.abort_decoder.decode(payload))
        elif kind == InputKind.UTILITY.value:
            call_id, method, args = self.utility_decoder.decode(payload)
            self._send(OutputKind.UTILITY, self.encoder.encode(self._call_utility(call_id, method, args)))
        elif kind == InputKind.SHUTDOWN.value:
            logger.info("engine core: shutdown requested")
            self.should_exit = True
        else:
            raise RuntimeError(f"unknown message kind {kind!r} on the engine-core input socket")

    def _call_utility(self, call_id: int, method: str, args: list[Any]) -> UtilityResult:
        if method not in _UTILITY_METHODS:
            return UtilityResult(call_id, error=f"unknown utility method {method!r}")
        try:
            return UtilityResult(call_id, result=getattr(self, method)(*args))
        except Exception as exc:  # a utility failure is the caller's, not the engine's
            return UtilityResult(call_id, error=f"{type(exc).__name__}: {exc}")

    def _maybe_heartbeat(self) -> None:
        now = time.monotonic()
        if now - self.last_sent < self.heartbeat_interval:
            return
        if os.getppid() != self.parent_pid:
            logger.warning("engine core: the front-end process is gone; exiting")
            self.should_exit = True
            return
        heartbeat = EngineCoreHeartbeat(time.time(), self.engine_core.make_stats(0))
        self._send(OutputKind.HEARTBEAT, self.encoder.encode(heartbeat))

    def _send(self, kind: OutputKind, payload: bytes) -> None:
        # NOBLOCK: a PUSH socket without a peer (the front end has gone) would block forever.
        deadline = time.monotonic() + 5.0
        while True:
            try:
                self.output_socket.send_multipart((kind.value, payload), flags=zmq.NOBLOCK, copy=False)
                break
            except zmq.Again:
                if os.getppid() != self.parent_pid or time.monotonic() > deadline:
                    logger.warning("engine core: the front end is not reading; exiting")
                    self.should_exit = True
                    return
                time.sleep(0.01)
        self.last_sent = time.monotonic()

    # -------------------------------------------------------------- utilities
    def reset_prefix_cache(self) -> bool:
        return self.engine_core.reset_prefix_cache()

    def close(self) -> None:
        self.input_socket.close(linger=0)
        self.output_socket.close()
        self.context.term()


def run_engine_core(
    engine_config: Any,
    input_address: str,
    output_address: str,
    ready_pipe: Any,
    heartbeat_interval: float = 1.0,
    log_level: int = logging.WARNING,
) -> None:
    """Process target: build the core, report ready (or the error), run until shut down."""
    logging.basicConfig(
        level=log_level, format="%(levelname)s %(asctime)s [engine-core] %(name)s: %(message)s"
    )
    # Ctrl-C and a SIGTERM sent to the whole process group (timeout, systemd) reach this
    # process too; the API server owns the shutdown: it drains in-flight requests, then
    # sends SHUTDOWN. If the API server dies instead, the heartbeat check notices.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    proc: EngineCoreProc | None = None
    try:
        proc = EngineCoreProc(engine_config, input_address, output_address, heartbeat_interval)
        ready_pipe.send(("ready", msgspec.structs.asdict(proc.ready_info())))
        ready_pipe.close()
        proc.run_busy_loop()
    except SystemExit:
        pass
    except BaseException as exc:  # report everything fatal, then exit non-zero
        text = "".join(traceback.format_exception(exc))
        logger.error("engine core failed:\n%s", text)
        _report_fatal(proc, ready_pipe, output_address, text)
        sys.exit(1)
    finally:
        if proc is not None:
            proc.close()


def _report_fatal(proc: EngineCoreProc | None, ready_pipe: Any, output_address: str, text: str) -> None:
    try:
        if not ready_pipe.closed:
            ready_pipe.send(("error", text))
            ready_pipe.close()
            return
    except (OSError, ValueError):
        pass
    try:
        if proc is not None:
            proc._send(OutputKind.ERROR, text.encode())
    except zmq.ZMQError:
        pass
