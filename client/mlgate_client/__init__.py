"""mlgate_client: send training records to mlgate and ask it for predictions.

- ``Producer`` / ``SyncProducer``: batching, msgpack, record ids, Idempotency-Keys,
  retries, bounded memory, a delivery report per record (``producer``, ``sync``).
- ``Predictor`` / ``SyncPredictor``: v2 predict under a deadline (``predictor``).
- ``RetryPolicy``: what is retried and how long to wait (``retry``).
- Errors: ``errors``. CLI: ``python -m mlgate_client send`` (``cli``).
"""

from mlgate_client.delivery import Delivery, Outcome
from mlgate_client.errors import (
    ApiError,
    BadGateway,
    BadRequest,
    BufferFull,
    ClientClosed,
    Conflict,
    DeadlineExceeded,
    Forbidden,
    MlgateError,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    PredictorClosed,
    ProducerClosed,
    RateLimited,
    RecordTooLarge,
    ServerError,
    TransportError,
    Unauthorized,
    UnexpectedAnswer,
    UnsupportedMediaType,
    ValidationFailed,
)
from mlgate_client.predictor import BatchPrediction, Prediction, Predictor, RowPrediction
from mlgate_client.producer import Producer, ProducerStats
from mlgate_client.retry import RetryPolicy
from mlgate_client.sync import SyncPredictor, SyncProducer
from mlgate_client.version import __version__

__all__ = [
    "ApiError",
    "BadGateway",
    "BadRequest",
    "BatchPrediction",
    "BufferFull",
    "ClientClosed",
    "Conflict",
    "DeadlineExceeded",
    "Delivery",
    "Forbidden",
    "MlgateError",
    "NotFound",
    "Outcome",
    "Overloaded",
    "PayloadTooLarge",
    "Prediction",
    "Predictor",
    "PredictorClosed",
    "Producer",
    "ProducerClosed",
    "ProducerStats",
    "RateLimited",
    "RecordTooLarge",
    "RetryPolicy",
    "RowPrediction",
    "ServerError",
    "SyncPredictor",
    "SyncProducer",
    "TransportError",
    "Unauthorized",
    "UnexpectedAnswer",
    "UnsupportedMediaType",
    "ValidationFailed",
    "__version__",
]
