"""Receiver of MLflow registry webhooks: checks MLflow's signature and announces base registrations.

A base version registered straight in MLflow (UI or API) fires `model_version.created`; this receiver
emits the same `transpeft.base.registered` Prefect event as `transpeft bases register`
(transpeft/events.py), whose deployment trigger in prefect.yaml starts the revalidation. Run it
with the launcher:

    TRANSPEFT_WEBHOOK_SECRET=... python mlflow/webhook_receiver.py --port 5055 [--prefect-api-url URL]

and register it in MLflow with `MlflowClient().create_webhook(name, url="http://127.0.0.1:5055/",
events=["model_version.created"], secret=<the same secret>)`.

How MLflow 3.x signs a delivery (mlflow/webhooks/delivery.py, `_generate_hmac_signature`):
    X-MLflow-Delivery-Id: a uuid4, X-MLflow-Timestamp: unix seconds,
    X-MLflow-Signature: "v1," + base64(HMAC-SHA256(secret, f"{delivery_id}.{timestamp}.{body}"))
and the body is {"entity": "model_version", "action": "created", "timestamp": ..., "data": {"name",
"version", "source", "run_id", "tags", "description"}}.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .events import BASE_REGISTERED, EventNotDelivered, base_registered_event, emit, prefect_api_url

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_ID_HEADER = "X-MLflow-Delivery-Id"
SIGNATURE_VERSION = "v1"
MAX_BODY = 64 * 1024
MAX_AGE_S = 300  # older deliveries are replays (MLflow's own retries end within about two minutes)
MAX_SKEW_S = 30  # tolerated clock difference between the MLflow host and this one
BODY_DEADLINE_S = 10  # a delivery's whole body must arrive within this (MLflow sends at most 64 KiB at once)


class SignatureError(Exception):
    """A delivery that does not prove it comes from MLflow with our secret; str() is the reason."""


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The X-MLflow-Signature value MLflow sends for this delivery."""
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


def verify_signature(secret: str, headers: Mapping[str, str], body: bytes, now: float | None = None) -> None:
    """Raise SignatureError unless the headers carry a fresh, valid MLflow signature of `body`."""
    lower = {key.lower(): value for key, value in headers.items()}
    delivery_id, timestamp, signature = (lower.get(name.lower()) for name in
                                         (DELIVERY_ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER))
    if not (delivery_id and timestamp and signature):
        raise SignatureError("missing signature headers")
    expected = sign(secret, delivery_id, timestamp, body).encode()
    # Standard Webhooks allows several space-separated signatures (key rotation); MLflow sends one.
    if not any(hmac.compare_digest(expected, candidate.encode()) for candidate in signature.split()):
        raise SignatureError("bad signature")
    # Checked after the signature, so a stale delivery is a genuine one being replayed.
    try:
        age = (time.time() if now is None else now) - int(timestamp)
    except ValueError:
        raise SignatureError(f"bad timestamp {timestamp!r}") from None
    if age > MAX_AGE_S:
        raise SignatureError(f"stale timestamp ({age:.0f}s old)")
    if age < -MAX_SKEW_S:
        raise SignatureError(f"timestamp {-age:.0f}s in the future")


def base_event(payload: dict, delivery_id: str, prefix: str = "base-") -> dict | None:
    """The Prefect event for a `model_version.created` delivery of a base model; None for anything else.

    Its id derives from the delivery id, so a delivery MLflow retries is the same event to Prefect.
    """
    if (payload.get("entity"), payload.get("action")) != ("model_version", "created"):
        return None
    data = payload.get("data")
    if not isinstance(data, dict):
        raise ValueError("model_version.created without a data object")
    name, mlflow_version = str(data.get("name", "")), str(data.get("version", ""))
    if not name.startswith(prefix) or name == prefix:
        return None
    tags = data.get("tags") or {}
    if not isinstance(tags, dict):
        raise ValueError("model version tags are not an object")
    if tags.get("status") == "registering":  # transpeft's own registration: it announces itself
        return None
    # Versions registered by transpeft carry the base's tags; one made by hand may have none of them.
    return base_registered_event(
        name[len(prefix):], str(tags.get("base_version") or mlflow_version), event_id_seed=delivery_id,
        fingerprint=tags.get("fingerprint"), mlflow_version=mlflow_version, source=tags.get("source"),
        parent=tags.get("parent") or None, registered_model=name, delivery_id=delivery_id,
        announced_by="mlflow-webhook")


class WebhookServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the listen backlog; socketserver's 5 resets connections under a burst of deliveries

    def __init__(self, address: tuple[str, int], secret: str, api_url: str, prefix: str):
        if not secret:
            raise ValueError("a webhook secret is required: unsigned deliveries are refused")
        super().__init__(address, _Handler)
        self.secret, self.api_url, self.prefix = secret, api_url, prefix
        # MLflow retries a delivery with the same id when it gets no answer; emit each id once. An id is
        # recorded only once its event was emitted, and attempts of one id take turns, so a retry that
        # arrives while the first attempt is still emitting waits for it instead of being told "done".
        self.emitted: dict[str, float] = {}
        self.lock = threading.Lock()
        self._turns: dict[str, tuple[threading.Lock, int]] = {}

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    @contextlib.contextmanager
    def turn(self, delivery_id: str):
        """Hold the delivery id: one attempt of it at a time."""
        with self.lock:  # the id's lock, and how many attempts hold or wait for it
            turn, holders = self._turns.get(delivery_id, (threading.Lock(), 0))
            self._turns[delivery_id] = (turn, holders + 1)
        try:
            with turn:
                yield
        finally:
            with self.lock:
                turn, holders = self._turns.pop(delivery_id)
                if holders > 1:
                    self._turns[delivery_id] = (turn, holders - 1)

    def emitted_before(self, delivery_id: str) -> bool:
        """Whether this id's event was emitted within the replay window."""
        now = time.monotonic()
        with self.lock:
            self.emitted = {key: t for key, t in self.emitted.items() if now - t < MAX_AGE_S + MAX_SKEW_S}
            return delivery_id in self.emitted

    def record_emitted(self, delivery_id: str) -> None:
        with self.lock:
            self.emitted[delivery_id] = time.monotonic()


class _Handler(BaseHTTPRequestHandler):
    server: WebhookServer
    timeout = 10  # seconds per socket read, so a client that never sends its body cannot hold a thread

    def do_GET(self):
        if self.path.rstrip("/") == "/health":
            return self._reply(200, "ok", quiet=True)
        self._reply(404, "not found")

    def do_POST(self):
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            return self._reply(411, "Content-Length required")
        if int(length) > MAX_BODY:
            self.close_connection = True  # the body stays unread
            return self._reply(413, f"body of {length} bytes exceeds {MAX_BODY}")
        body = self._read_body(int(length))
        if body is None:
            self.close_connection = True
            return self._reply(408, f"body not received within {BODY_DEADLINE_S} s")
        delivery_id = self.headers.get(DELIVERY_ID_HEADER, "-")
        try:
            verify_signature(self.server.secret, self.headers, body)
        except SignatureError as exc:
            return self._reply(401, str(exc), delivery_id)
        try:
            payload = json.loads(body)
            if not isinstance(payload, dict):
                raise ValueError("not a JSON object")
            event = base_event(payload, delivery_id, self.server.prefix)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            return self._reply(400, f"bad payload: {exc}", delivery_id)
        kind, data = f"{payload.get('entity')}.{payload.get('action')}", payload.get("data")
        model = data.get("name") if isinstance(data, dict) else None
        if event is None:
            return self._reply(200, f"ignored {kind} of {model!r}", delivery_id)
        mlflow_version = event["payload"]["mlflow_version"]
        with self.server.turn(delivery_id):
            if self.server.emitted_before(delivery_id):
                return self._reply(200, f"already emitted for {model} version {mlflow_version}", delivery_id)
            try:
                emit(event, self.server.api_url)
            except EventNotDelivered as exc:  # MLflow retries a 5xx; the id stays unrecorded, so a retry emits
                return self._reply(502, f"emit failed: {exc}", delivery_id)
            self.server.record_emitted(delivery_id)
        resource = event["resource"]
        return self._reply(202, f"emitted {BASE_REGISTERED} family={resource['transpeft.family']} "
                                f"version={resource['transpeft.version']} event={event['id']}", delivery_id)

    def _read_body(self, length: int) -> bytes | None:
        """The body, or None when it did not arrive whole within BODY_DEADLINE_S: a client that trickles
        its bytes (each read within the socket timeout) is cut off all the same."""
        deadline = time.monotonic() + BODY_DEADLINE_S
        chunks, left = [], length
        while left:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.connection.settimeout(min(remaining, self.timeout))
            try:
                chunk = self.rfile.read1(left)
            except TimeoutError:
                return None
            if not chunk:  # the client hung up
                return None
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def _reply(self, status: int, reason: str, delivery_id: str = "-", quiet: bool = False) -> None:
        if not quiet:
            verdict = "accepted" if status < 300 else "rejected" if status < 500 else "failed"
            log.log(logging.INFO if status < 300 else logging.WARNING, "%s %d delivery=%s from %s: %s",
                    verdict, status, delivery_id, self.client_address[0], reason)
        body = json.dumps({"status": status, "detail": reason}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):  # noqa: A002 - the stdlib's name
        log.debug("%s " + format, self.client_address[0], *args)


def make_server(host: str, port: int, secret: str, api_url: str | None = None, prefix: str = "base-") -> WebhookServer:
    """A receiver bound to host:port (port 0 picks a free one) that emits to the Prefect API at `api_url`
    (default: PREFECT_API_URL, else the local server); run it with serve_forever()."""
    return WebhookServer((host, port), secret, prefect_api_url(api_url), prefix)
