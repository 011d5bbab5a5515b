"""The least a hand-written aiohttp app doing mlgate's work costs: the second reference
of ``bench.workload`` beside the bare app answering a constant.

``python -m bench.handwritten predict MODEL PORT``: ``POST /predict`` decodes
``{"features": [...]}`` with msgspec, runs the ONNX model on that one row in the
handler (no batching, no thread) and answers the arg-max and its probability.

``python -m bench.handwritten decode PORT``: ``POST /decode`` decodes
``{"features": [...]}`` the same way into a float32 row, checks it finite and answers
a constant: the least any Python server must do with a predict body before the model.

``python -m bench.handwritten ingest BOOTSTRAP TOPIC PORT``: ``POST /ingest`` decodes
the msgpack batch with msgspec (the records' fields typed, no other checks), writes
each record as JSON with aiokafka's ``send`` (``acks=all``, keyed by ``record_id``)
and answers 202 once every record is acknowledged.

``python -m bench.handwritten ingest-rdkafka BOOTSTRAP TOPIC PORT``: the same on
librdkafka (confluent-kafka), ``POST /ingest-rdkafka``.

No authentication, limits, validation beyond types, dedup, metrics or logs: what
"a plain aiohttp app" does, on uvloop. The ratio of mlgate to it is what mlgate's
guarantees cost; the ratio of it to the constant app is what the work itself costs.
"""

from __future__ import annotations

import asyncio
import sys
from datetime import datetime

import msgspec


class _PredictRequest(msgspec.Struct):
    features: list[float]


class _Record(msgspec.Struct):
    features: list[float]
    record_id: str | None = None
    timestamp: datetime | float | None = None
    label: float | None = None
    metadata: dict[str, str | int | float | bool] = {}


class _Batch(msgspec.Struct):
    source: str
    records: list[_Record]


def serve_predict(model: str, port: int) -> None:
    import numpy as np
    import onnxruntime as ort
    from aiohttp import web

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    decoder, encoder = msgspec.json.Decoder(_PredictRequest), msgspec.json.Encoder()

    async def predict(request: web.Request) -> web.Response:
        row = np.asarray(decoder.decode(await request.read()).features, dtype=np.float32)
        probabilities = session.run(None, {input_name: row.reshape(1, -1)})[-1][0]
        best = int(np.argmax(probabilities))
        answer = {"prediction": best, "confidence": float(probabilities[best])}
        return web.Response(body=encoder.encode(answer), content_type="application/json")

    app = web.Application()
    app.router.add_post("/predict", predict)
    _run(app, port)


def serve_decode(port: int) -> None:
    import numpy as np
    from aiohttp import web

    decoder, answer = msgspec.json.Decoder(_PredictRequest), b'{"prediction": 1}'

    async def decode(request: web.Request) -> web.Response:
        features = decoder.decode(await request.read()).features
        row = np.fromiter(features, dtype=np.float32, count=len(features))
        if not np.isfinite(row).all():
            raise web.HTTPUnprocessableEntity()
        return web.Response(body=answer, content_type="application/json")

    app = web.Application()
    app.router.add_post("/decode", decode)
    _run(app, port)


def serve_ingest(bootstrap: str, topic: str, port: int) -> None:
    from aiohttp import web
    from aiokafka import AIOKafkaProducer

    decoder, encoder = msgspec.msgpack.Decoder(_Batch), msgspec.json.Encoder()

    async def producer_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2)
        await producer.start()
        app["producer"] = producer
        yield
        await producer.stop()

    async def ingest(request: web.Request) -> web.Response:
        batch = decoder.decode(await request.read())
        producer: AIOKafkaProducer = request.app["producer"]
        sent = [
            await producer.send(
                topic,
                encoder.encode(record),
                key=(record.record_id or "").encode(),
                headers=[("source", batch.source.encode())],
            )
            for record in batch.records
        ]
        await asyncio.gather(*sent)
        return web.json_response({"records_accepted": len(sent)}, status=202)

    app = web.Application()
    app.cleanup_ctx.append(producer_ctx)
    app.router.add_post("/ingest", ingest)
    _run(app, port)


def serve_ingest_rdkafka(bootstrap: str, topic: str, port: int) -> None:
    """As ``serve_ingest``, with librdkafka (confluent-kafka) instead of aiokafka: its
    produce requests pipelined (librdkafka's default, several in flight to a broker,
    where aiokafka sends a broker one at a time), a 0.5 ms linger, Nagle off (its best
    of the settings tried on ``workload`` single records); delivery reports polled on a
    thread and handed to the loop once per poll."""
    import threading

    from aiohttp import web
    from confluent_kafka import Producer

    decoder, encoder = msgspec.msgpack.Decoder(_Batch), msgspec.json.Encoder()

    async def producer_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        loop = asyncio.get_running_loop()
        producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "acks": "all",
                "linger.ms": 0.5,
                "socket.nagle.disable": True,
                "enable.idempotence": False,
            }
        )
        done: list[tuple[asyncio.Future[None], object]] = []
        stopping = threading.Event()

        def settle(reports: list[tuple[asyncio.Future[None], object]]) -> None:
            for future, error in reports:
                if not future.done():
                    if error is None:
                        future.set_result(None)
                    else:
                        future.set_exception(RuntimeError(str(error)))

        def poller() -> None:
            while not stopping.is_set():
                producer.poll(0.05)
                if done:
                    reports = done[:]
                    del done[: len(reports)]
                    loop.call_soon_threadsafe(settle, reports)

        thread = threading.Thread(target=poller, daemon=True)
        thread.start()

        def send(value: bytes, key: bytes, headers: list[tuple[str, bytes]]) -> asyncio.Future[None]:
            future = loop.create_future()
            producer.produce(
                topic,
                value,
                key,
                headers=headers,
                on_delivery=lambda error, _message: done.append((future, error)),
            )
            return future

        app["send"] = send
        yield
        stopping.set()
        thread.join()
        producer.flush(10)

    async def ingest(request: web.Request) -> web.Response:
        batch = decoder.decode(await request.read())
        send = request.app["send"]
        sent = [
            send(
                encoder.encode(record),
                (record.record_id or "").encode(),
                [("source", batch.source.encode())],
            )
            for record in batch.records
        ]
        await asyncio.gather(*sent)
        return web.json_response({"records_accepted": len(sent)}, status=202)

    app = web.Application()
    app.cleanup_ctx.append(producer_ctx)
    app.router.add_post("/ingest-rdkafka", ingest)
    _run(app, port)


def _run(app: object, port: int) -> None:
    import uvloop
    from aiohttp import web

    assert isinstance(app, web.Application)
    web.run_app(
        app, host="127.0.0.1", port=port, access_log=None, print=None, loop=uvloop.new_event_loop()
    )


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    if role == "predict":
        serve_predict(args[0], int(args[1]))
    elif role == "decode":
        serve_decode(int(args[0]))
    elif role == "ingest":
        serve_ingest(args[0], args[1], int(args[2]))
    elif role == "ingest-rdkafka":
        serve_ingest_rdkafka(args[0], args[1], int(args[2]))
    else:
        raise SystemExit(f"unknown role {role!r}")
