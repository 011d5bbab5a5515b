"""Open Inference Protocol (KServe v2 / Triton HTTP) wire types.

The JSON shapes stock Triton and KServe clients send and expect: server and model
metadata, inference requests and responses with JSON tensors (``data``, nested or
flat, row-major) or binary tensors (``parameters.binary_data_size``, the bytes after
the JSON header, see ``service.routes.oip``), and the repository extension's index,
load and unload bodies. Inbound types forbid unknown fields; ``parameters`` maps stay
open, as the protocol allows custom ones.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

MAX_RANK = 16
# Tabular models exported with one input per column have hundreds (a review: a model
# of 80 inputs loaded and advertised, and every infer of it refused); the body's limit
# bounds what they hold.
MAX_TENSORS = 4096
# Triton echoes any id; this keeps one log line's worth.
MAX_ID_LENGTH = 4096

Datatype = Literal[
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
    "BF16",
]
Parameters = dict[str, str | int | float | bool]
# Triton's own parameters are a dozen; custom ones ride beside them. A map is built
# whole before its length is checked: a body's are counted first (``check_tensor_budget``).
MAX_PARAMETERS = 256
RequestParameters = Annotated[Parameters, msgspec.Meta(max_length=MAX_PARAMETERS)]
TensorName = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Shape = Annotated[list[Annotated[int, msgspec.Meta(ge=0)]], msgspec.Meta(max_length=MAX_RANK)]


class RequestInput(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: TensorName
    shape: Shape
    datatype: Datatype
    parameters: RequestParameters = {}
    # Row-major values, flat or nested; absent when the tensor travels as binary data.
    data: list[Any] | None = None


class RequestOutput(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: TensorName
    parameters: RequestParameters = {}


class InferenceRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    inputs: Annotated[list[RequestInput], msgspec.Meta(min_length=1, max_length=MAX_TENSORS)]
    id: Annotated[str, msgspec.Meta(max_length=MAX_ID_LENGTH)] | None = None
    parameters: RequestParameters = {}
    outputs: Annotated[list[RequestOutput], msgspec.Meta(max_length=MAX_TENSORS)] | None = None


class ResponseOutput(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any] | None = None


class InferenceResponse(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    model_name: str
    outputs: list[ResponseOutput]
    model_version: str | None = None
    id: str | None = None
    parameters: Parameters | None = None


class ServerMetadata(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    version: str
    extensions: list[str]


class StatisticDuration(msgspec.Struct, frozen=True, kw_only=True):
    count: int
    ns: int


class InferStatistics(msgspec.Struct, frozen=True, kw_only=True):
    success: StatisticDuration
    fail: StatisticDuration
    queue: StatisticDuration
    compute_input: StatisticDuration
    compute_infer: StatisticDuration
    compute_output: StatisticDuration
    cache_hit: StatisticDuration
    cache_miss: StatisticDuration


class InferBatchStatistics(msgspec.Struct, frozen=True, kw_only=True):
    batch_size: int
    compute_input: StatisticDuration
    compute_infer: StatisticDuration
    compute_output: StatisticDuration


class ModelStatistics(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    version: str
    last_inference: int
    inference_count: int
    execution_count: int
    inference_stats: InferStatistics
    batch_stats: list[InferBatchStatistics]


class ModelStatisticsResponse(msgspec.Struct, frozen=True, kw_only=True):
    """Triton's statistics extension (``GET /v2/models[/{model}[/versions/{v}]]/stats``)."""

    model_stats: list[ModelStatistics]


class Liveness(msgspec.Struct, frozen=True, kw_only=True):
    live: bool


class Readiness(msgspec.Struct, frozen=True, kw_only=True):
    ready: bool


class ModelReadiness(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    name: str
    ready: bool
    version: str | None = None


class TensorMetadata(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ConfigTensor(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    data_type: str  # Triton's spelling: TYPE_FP32
    dims: list[int]


class DynamicBatching(msgspec.Struct, frozen=True, kw_only=True):
    max_queue_delay_microseconds: int


class ModelConfig(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The subset of Triton's model configuration its clients read."""

    name: str
    platform: str
    backend: str
    max_batch_size: int
    input: list[ConfigTensor]
    output: list[ConfigTensor]
    dynamic_batching: DynamicBatching | None = None


class RepositoryIndexRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    ready: bool = False


class RepositoryIndexEntry(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    name: str
    version: str | None = None
    state: str | None = None
    reason: str | None = None


class RepositoryModelRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The load and unload bodies; ``parameters`` may carry Triton's options."""

    parameters: dict[str, Any] = {}
