"""Tests of the MLflow webhook receiver (transpeft/webhook.py): every refusal, then MLflow end to end.

    .venv/bin/python -m pytest tests/test_webhook.py -q                  # all (~15 s)
    .venv/bin/python -m pytest tests/test_webhook.py -q -m "not server"  # without the MLflow server

Deliveries are signed with MLflow's own signing function, so passing here means the receiver accepts
what the installed MLflow sends.
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from mlflow.webhooks.delivery import _generate_hmac_signature as mlflow_sign

from servers import free_port, start_mlflow
from transpeft.webhook import MAX_BODY, SignatureError, make_server, sign, verify_signature

SECRET = "test-secret"
NOW = 1_800_000_000


def payload(name="base-demo", version="3", tags=None, entity="model_version", action="created") -> bytes:
    data = {"name": name, "version": version, "source": "runs:/abc/base", "run_id": "abc",
            "tags": {"base_version": "v2"} if tags is None else tags, "description": None}
    return json.dumps({"entity": entity, "action": action, "timestamp": "2027-01-15T08:00:00+00:00",
                       "data": data}).encode()


def signed(body: bytes, secret: str = SECRET, timestamp: int | None = None, delivery_id: str | None = None) -> dict:
    """Headers as MLflow sends them, signed by MLflow's own function."""
    delivery_id = delivery_id or str(uuid.uuid4())
    timestamp = str(int(time.time()) if timestamp is None else timestamp)
    return {"Content-Type": "application/json", "X-MLflow-Delivery-Id": delivery_id,
            "X-MLflow-Timestamp": timestamp,
            "X-MLflow-Signature": mlflow_sign(secret, delivery_id, timestamp, body.decode())}


# ---- verify_signature, no sockets -------------------------------------------------------------------

def test_sign_matches_mlflow():
    body = payload()
    assert sign(SECRET, "id-1", "123", body) == mlflow_sign(SECRET, "id-1", "123", body.decode())


def test_accepts_mlflow_signed_delivery():
    body = payload()
    verify_signature(SECRET, signed(body, timestamp=NOW), body, now=NOW + 5)
    # Header names are case-insensitive in HTTP.
    verify_signature(SECRET, {k.lower(): v for k, v in signed(body, timestamp=NOW).items()}, body, now=NOW)


@pytest.mark.parametrize("missing", ["X-MLflow-Signature", "X-MLflow-Timestamp", "X-MLflow-Delivery-Id"])
def test_refuses_missing_header(missing):
    body = payload()
    headers = signed(body, timestamp=NOW)
    del headers[missing]
    with pytest.raises(SignatureError, match="missing signature headers"):
        verify_signature(SECRET, headers, body, now=NOW)


@pytest.mark.parametrize("case", ["wrong secret", "tampered body", "tampered delivery id", "not base64"])
def test_refuses_bad_signature(case):
    body = payload()
    headers = signed(body, secret="other" if case == "wrong secret" else SECRET, timestamp=NOW)
    if case == "tampered body":
        body = payload(name="base-evil")
    if case == "tampered delivery id":
        headers["X-MLflow-Delivery-Id"] = str(uuid.uuid4())
    if case == "not base64":
        headers["X-MLflow-Signature"] = "v1,é"
    with pytest.raises(SignatureError, match="bad signature"):
        verify_signature(SECRET, headers, body, now=NOW)


@pytest.mark.parametrize("offset, reason", [(-301, "stale"), (-3600, "stale"), (600, "future"), (31, "future")])
def test_refuses_timestamp_out_of_window(offset, reason):
    body = payload()
    with pytest.raises(SignatureError, match=reason):
        verify_signature(SECRET, signed(body, timestamp=NOW + offset), body, now=NOW)


def test_accepts_timestamp_at_window_edges():
    body = payload()
    for offset in (-300, 30):
        verify_signature(SECRET, signed(body, timestamp=NOW + offset), body, now=NOW)


def test_refuses_signed_but_non_numeric_timestamp():
    body = payload()
    headers = {"X-MLflow-Delivery-Id": "d", "X-MLflow-Timestamp": "soon",
               "X-MLflow-Signature": mlflow_sign(SECRET, "d", "soon", body.decode())}
    with pytest.raises(SignatureError, match="bad timestamp"):
        verify_signature(SECRET, headers, body, now=NOW)


def test_refuses_empty_secret():
    with pytest.raises(ValueError, match="secret"):
        make_server("127.0.0.1", 0, "", "http://127.0.0.1:9/", "base-")


# ---- the receiver over HTTP, with a sink that records what it forwards -------------------------------

def serve(server):
    # A short poll interval keeps shutdown() (and so each test teardown) quick.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server


def stop(server):
    server.shutdown()
    server.server_close()


class Sink(ThreadingHTTPServer):
    """Records every JSON body POSTed to it."""

    daemon_threads = True

    def __init__(self):
        self.received: list[dict] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(handler):
                self.received.append(json.loads(handler.rfile.read(int(handler.headers["Content-Length"]))))
                handler.send_response(200)
                handler.send_header("Content-Length", "0")
                handler.end_headers()

            def log_message(handler, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/notify"


@pytest.fixture
def sink():
    server = serve(Sink())
    yield server
    stop(server)


@pytest.fixture
def receiver(sink):
    server = serve(make_server("127.0.0.1", 0, SECRET, sink.url))
    yield server
    stop(server)


@pytest.fixture
def webhook_log(caplog):
    caplog.set_level(logging.INFO, logger="transpeft.webhook")
    return caplog


def post(server, body: bytes, headers: dict) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    try:
        conn.request("POST", "/", body=body, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_forwards_base_registration(receiver, sink, webhook_log):
    body = payload(name="base-demo", version="3", tags={"base_version": "v2"})
    headers = signed(body)
    status, answer = post(receiver, body, headers)
    assert status == 202, answer
    assert sink.received == [{"event": "transpeft.base.registered", "family": "demo", "version": "v2",
                              "mlflow_version": "3", "registered_model": "base-demo",
                              "delivery_id": headers["X-MLflow-Delivery-Id"]}]
    assert "accepted 202" in webhook_log.text


def test_version_falls_back_to_mlflow_version(receiver, sink):
    body = payload(name="base-demo", version="4", tags={})
    assert post(receiver, body, signed(body))[0] == 202
    assert sink.received[0]["version"] == "4"


@pytest.mark.parametrize("body", [payload(name="adapter-x"), payload(name="base-"),
                                  payload(entity="registered_model", action="created")])
def test_acknowledges_and_ignores_other_events(receiver, sink, body, webhook_log):
    status, answer = post(receiver, body, signed(body))
    assert status == 200 and answer["detail"].startswith("ignored"), answer
    assert sink.received == []
    assert "ignored" in webhook_log.text


def test_forwards_a_retried_delivery_once(receiver, sink):
    body = payload()
    headers = signed(body)
    assert post(receiver, body, headers)[0] == 202
    status, answer = post(receiver, body, headers)  # MLflow retries with the same delivery id
    assert status == 200 and "already forwarded" in answer["detail"]
    assert len(sink.received) == 1


@pytest.mark.parametrize("case", ["unsigned", "bad signature", "stale", "future"])
def test_http_refuses_unauthenticated(receiver, sink, webhook_log, case):
    body = payload()
    headers = {
        "unsigned": {"Content-Type": "application/json"},
        "bad signature": signed(body, secret="wrong"),
        "stale": signed(body, timestamp=int(time.time()) - 600),
        "future": signed(body, timestamp=int(time.time()) + 600),
    }[case]
    status, answer = post(receiver, body, headers)
    assert status == 401, answer
    assert sink.received == []
    assert "rejected 401" in webhook_log.text


def test_http_refuses_non_json(receiver, sink, webhook_log):
    body = b"<xml>not json</xml>"
    status, answer = post(receiver, body, signed(body))
    assert status == 400 and "bad payload" in answer["detail"]
    assert sink.received == []
    assert "rejected 400" in webhook_log.text


def test_http_refuses_oversized_body_without_reading_it(receiver, sink, webhook_log):
    # Announce 10 MB and send none of it: the answer must come from the header alone.
    conn = http.client.HTTPConnection(*receiver.server_address[:2], timeout=5)
    try:
        conn.putrequest("POST", "/")
        conn.putheader("Content-Length", str(10 * 1024 * 1024))
        conn.putheader("Content-Type", "application/json")
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 413
    finally:
        conn.close()
    body = b" " * (MAX_BODY + 1)
    assert post(receiver, body, signed(body))[0] == 413
    assert sink.received == []
    assert "rejected 413" in webhook_log.text


def test_forward_failure_answers_502(sink, webhook_log):
    dead = f"http://127.0.0.1:{free_port()}/notify"  # nothing listens there
    server = serve(make_server("127.0.0.1", 0, SECRET, dead))
    try:
        body = payload()
        headers = signed(body)
        status, answer = post(server, body, headers)
        assert status == 502 and "forward failed" in answer["detail"]
        # The retry of a failed delivery is tried again, not treated as a duplicate.
        assert post(server, body, headers)[0] == 502
    finally:
        stop(server)
    assert "failed 502" in webhook_log.text


# ---- end to end: a real MLflow server fires the webhook ----------------------------------------------

def wait_until(condition, timeout: float = 30, step: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


@pytest.mark.server
def test_mlflow_delivers_base_registration(tmp_path, monkeypatch, webhook_log):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail at once, not after minutes of retries
    from mlflow import MlflowClient

    sink, wrong_sink = serve(Sink()), serve(Sink())
    receiver = serve(make_server("127.0.0.1", 0, SECRET, sink.url))
    # Same receiver code and secret, but MLflow will sign for it with another secret.
    wrong_receiver = serve(make_server("127.0.0.1", 0, SECRET, wrong_sink.url))
    mlflow_server = start_mlflow(tmp_path / "mlflow")
    try:
        client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
        # Both hooks exist before the first version, so MLflow's per-event hook cache sees them.
        client.create_webhook(name="transpeft-base", url=receiver.url, events=["model_version.created"],
                              secret=SECRET)
        client.create_webhook(name="wrong-secret", url=wrong_receiver.url, events=["model_version.created"],
                              secret="not-the-secret")

        run = client.create_run(client.create_experiment("bases"))
        (tmp_path / "base").mkdir()
        (tmp_path / "base" / "config.json").write_text('{"model_type": "llama"}')
        client.log_artifacts(run.info.run_id, str(tmp_path / "base"), artifact_path="base")
        client.set_terminated(run.info.run_id)
        for name, tags in (("base-demo", {"base_version": "v2"}), ("adapter-x", {})):
            client.create_registered_model(name)
            client.create_model_version(name, source=f"runs:/{run.info.run_id}/base", run_id=run.info.run_id,
                                        tags=tags)

        def messages():
            return [r.getMessage() for r in webhook_log.records if r.name == "transpeft.webhook"]

        assert wait_until(lambda: sink.received
                          and any("'adapter-x'" in m for m in messages())
                          and sum("bad signature" in m for m in messages()) == 2), messages()
        assert len(sink.received) == 1
        assert {k: v for k, v in sink.received[0].items() if k != "delivery_id"} == {
            "event": "transpeft.base.registered", "family": "demo", "version": "v2", "mlflow_version": "1",
            "registered_model": "base-demo"}
        assert wrong_sink.received == []
        assert sum(m.startswith("rejected 401") for m in messages()) == 2
    finally:
        mlflow_server.stop()
        for server in (receiver, wrong_receiver, sink, wrong_sink):
            stop(server)
