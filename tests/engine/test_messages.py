"""The wire protocol: every message survives msgpack as it travels over ZMQ."""

from __future__ import annotations

import msgspec

from pagedserve.engine.messages import (
    EngineCoreHeartbeat,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreReadyInfo,
    EngineCoreRequest,
    InputKind,
    OutputKind,
    SchedulerStats,
    UtilityResult,
)
from pagedserve.sampling_params import RequestOutputKind, SamplingParams


def _roundtrip(value, kind):  # noqa: ANN001, ANN202
    return msgspec.msgpack.Decoder(kind).decode(msgspec.msgpack.Encoder().encode(value))


def test_request_roundtrip_keeps_every_sampling_field():
    params = SamplingParams(
        n=1, temperature=0.7, top_p=0.9, top_k=5, min_p=0.1, seed=42, stop=["\n\n"],
        stop_token_ids=[3], max_tokens=9, min_tokens=2, logprobs=3, prompt_logprobs=1,
        logit_bias={11: -2.5}, allowed_token_ids=[4, 5, 11], truncate_prompt_tokens=8,
        output_kind=RequestOutputKind.DELTA, include_stop_str_in_output=True,
    )
    request = EngineCoreRequest(
        "req-1", [1, 2, 3], params, arrival_time=123.25, priority=-1, cache_salt="tenant"
    )
    decoded = _roundtrip(request, EngineCoreRequest)
    assert decoded == request
    assert decoded.sampling_params.logit_bias == {11: -2.5}
    assert decoded.sampling_params.output_kind is RequestOutputKind.DELTA
    # Defaults are omitted on the wire, and still come back.
    plain = EngineCoreRequest("r", [1], SamplingParams(), arrival_time=1.0)
    assert _roundtrip(plain, EngineCoreRequest).cache_salt is None


def test_outputs_heartbeat_utility_and_ready_roundtrip():
    stats = SchedulerStats(num_running_reqs=2, num_waiting_reqs=1, kv_cache_usage=0.25,
                           prefix_cache_queries=64, prefix_cache_hits=32, num_preemptions=1,
                           num_scheduled_tokens=17)
    outputs = EngineCoreOutputs(
        [
            EngineCoreOutput("a", [7], new_logprobs=[[(7, -0.1, 1), (9, -2.0, 2)]],
                             num_cached_tokens=16, first_scheduled_time=5.5),
            EngineCoreOutput("b", [], finish_reason="error", stop_reason="bad request"),
            EngineCoreOutput("c", [], new_prompt_logprobs=[[(4, -1.0, 1)], [(5, -0.5, 1)]]),
        ],
        scheduler_stats=stats,
        timestamp=99.0,
    )
    decoded = _roundtrip(outputs, EngineCoreOutputs)
    assert decoded.scheduler_stats == stats
    assert [o.request_id for o in decoded.outputs] == ["a", "b", "c"]
    assert decoded.outputs[0].new_logprobs == [[(7, -0.1, 1), (9, -2.0, 2)]]
    assert decoded.outputs[1].finished and not decoded.outputs[0].finished
    assert decoded.outputs[2].new_prompt_logprobs == [[(4, -1.0, 1)], [(5, -0.5, 1)]]
    heartbeat = EngineCoreHeartbeat(1.5, stats)
    assert _roundtrip(heartbeat, EngineCoreHeartbeat) == heartbeat
    for result in (UtilityResult(3, result=True), UtilityResult(4, error="boom")):
        assert _roundtrip(result, UtilityResult) == result
    info = _roundtrip_ready()
    assert info.num_blocks == 100 and info.device == "cpu"


def _roundtrip_ready() -> EngineCoreReadyInfo:
    # The ready report travels as a dict through a multiprocessing pipe.
    fields = {f: getattr(_READY, f) for f in _READY.__struct_fields__}
    return EngineCoreReadyInfo(**msgspec.structs.asdict(EngineCoreReadyInfo(**fields)))


_READY = msgspec.convert(
    {"pid": 1, "load_seconds": 2.0, "num_blocks": 100, "block_size": 16, "num_threads": 2,
     "isa": "avx512", "device": "cpu", "kv_cache_memory_bytes": 1 << 20},
    EngineCoreReadyInfo,
)


def test_message_kinds_are_distinct_single_bytes():
    for kinds in (InputKind, OutputKind):
        values = [k.value for k in kinds]
        assert all(len(v) == 1 for v in values)
        assert len(set(values)) == len(values)
