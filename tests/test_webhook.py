"""Tests of the MLflow webhook receiver (transpeft/webhook.py): every refusal, then MLflow end to end.

    .venv/bin/python -m pytest tests/test_webhook.py -q                  # all (~45 s: Prefect, deploy, MLflow)
    .venv/bin/python -m pytest tests/test_webhook.py -q -m "not server"  # without the Prefect and MLflow servers

Deliveries are signed with MLflow's own signing function, so passing here means the receiver accepts
what the installed MLflow sends. Accepted deliveries become events on a real Prefect server; receivers
whose Prefect is a dead port prove a refusal happened before any event was tried (that would be a 502).
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from mlflow.webhooks.delivery import _generate_hmac_signature as mlflow_sign

from servers import free_port, prefect_api, start_mlflow, stored_events, wait_until
from transpeft.events import BASE_REGISTERED, EventNotDelivered
from transpeft.webhook import MAX_BODY, SignatureError, base_event, make_server, sign, verify_signature

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
        make_server("127.0.0.1", 0, "", "http://127.0.0.1:9/api", "base-")


# ---- base_event, no sockets ------------------------------------------------------------------------

def test_base_event_is_the_base_registered_event_of_the_family_and_version():
    event = base_event(json.loads(payload(name="base-demo", version="3", tags={
        "base_version": "v2", "fingerprint": "sha256:abc", "source": "demo/bases/v2", "parent": "v1"})), "d-1")
    assert event["event"] == BASE_REGISTERED
    assert event["resource"] == {"prefect.resource.id": "transpeft.base.demo.v2", "prefect.resource.name": "demo/v2",
                                 "transpeft.family": "demo", "transpeft.version": "v2"}
    assert event["payload"] == {"fingerprint": "sha256:abc", "mlflow_version": "3", "source": "demo/bases/v2",
                                "parent": "v1", "registered_model": "base-demo", "delivery_id": "d-1",
                                "announced_by": "mlflow-webhook"}


def test_base_event_id_follows_the_delivery_id():
    body = json.loads(payload())
    assert base_event(body, "d-1")["id"] == base_event(body, "d-1")["id"] != base_event(body, "d-2")["id"]


def test_base_event_version_falls_back_to_mlflow_version():
    event = base_event(json.loads(payload(name="base-demo", version="4", tags={})), "d")
    assert event["resource"]["transpeft.version"] == "4"
    assert event["payload"]["fingerprint"] is None and event["payload"]["parent"] is None


@pytest.mark.server
def test_a_delivery_sent_twenty_times_at_once_is_emitted_once(live_receiver):
    body = payload(name="base-stampede")
    headers = signed(body)
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: post(live_receiver, body, headers), range(20)))
    assert sorted(status for status, _ in answers) == [200] * 19 + [202]
    assert all("already emitted" in answer["detail"] for status, answer in answers if status == 200)


def test_a_retry_during_a_failing_first_attempt_is_not_told_done(receiver, monkeypatch):
    """The first attempt's emit fails slowly; a retry of the same delivery that arrives meanwhile waits for
    it and then emits itself, instead of answering "already emitted" for an event Prefect never got."""
    import transpeft.webhook as webhook

    calls = []

    def flaky_emit(event, api_url):
        calls.append(event["id"])
        time.sleep(0.5)
        if len(calls) == 1:
            raise EventNotDelivered("Prefect went away")
        return event["id"]

    monkeypatch.setattr(webhook, "emit", flaky_emit)
    body = payload(name="base-flaky")
    headers = signed(body)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, receiver, body, headers)
        time.sleep(0.1)
        retry = pool.submit(post, receiver, body, headers)
        assert (first.result()[0], retry.result()[0]) == (502, 202)
    assert len(calls) == 2 and post(receiver, body, headers)[0] == 200  # and a third delivery is a duplicate


@pytest.mark.parametrize("body", [payload(name="adapter-x"), payload(name="base-"),
                                  payload(entity="registered_model", action="created"),
                                  payload(tags={"base_version": "v2", "status": "registering"})])
def test_base_event_is_none_for_other_events(body):
    """Not a base, not a version, or transpeft's own registration (which emits its own event)."""
    assert base_event(json.loads(body), "d") is None


# ---- the receiver over HTTP -----------------------------------------------------------------------------

def serve(server):
    # A short poll interval keeps shutdown() (and so each test teardown) quick.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server


def stop(server):
    server.shutdown()
    server.server_close()


@pytest.fixture
def receiver():
    """A receiver whose Prefect server is a dead port: any delivery that reaches emit() answers 502."""
    server = serve(make_server("127.0.0.1", 0, SECRET, f"http://127.0.0.1:{free_port()}/api"))
    yield server
    stop(server)


@pytest.fixture
def live_receiver(prefect_server):
    """A receiver that emits to the session's real Prefect server."""
    server = serve(make_server("127.0.0.1", 0, SECRET, prefect_server))
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




@pytest.mark.server
def test_emits_base_registration(live_receiver, prefect_server, webhook_log):
    body = payload(name="base-hooked", version="3", tags={"base_version": "v2"})
    headers = signed(body)
    status, answer = post(live_receiver, body, headers)
    assert status == 202, answer
    event_id = base_event(json.loads(body), headers["X-MLflow-Delivery-Id"])["id"]
    assert f"event={event_id}" in answer["detail"]
    (stored,) = wait_until(lambda: stored_events(prefect_server, id={"id": [event_id]}))
    assert stored["event"] == BASE_REGISTERED
    assert stored["resource"]["transpeft.family"] == "hooked" and stored["resource"]["transpeft.version"] == "v2"
    assert stored["payload"]["delivery_id"] == headers["X-MLflow-Delivery-Id"]
    assert stored["payload"]["announced_by"] == "mlflow-webhook"
    assert "accepted 202" in webhook_log.text


@pytest.mark.server
def test_emits_a_retried_delivery_once(live_receiver):
    body = payload(name="base-retried")
    headers = signed(body)
    assert post(live_receiver, body, headers)[0] == 202
    status, answer = post(live_receiver, body, headers)  # MLflow retries with the same delivery id
    assert status == 200 and "already emitted" in answer["detail"], answer


@pytest.mark.parametrize("body", [payload(name="adapter-x"), payload(name="base-"),
                                  payload(entity="registered_model", action="created"),
                                  payload(tags={"base_version": "v2", "status": "registering"})])
def test_acknowledges_and_ignores_other_events(receiver, body, webhook_log):
    status, answer = post(receiver, body, signed(body))
    assert status == 200 and answer["detail"].startswith("ignored"), answer  # no emit tried: not 502
    assert "ignored" in webhook_log.text


@pytest.mark.parametrize("case", ["unsigned", "bad signature", "stale", "future"])
def test_http_refuses_unauthenticated(receiver, webhook_log, case):
    body = payload()
    headers = {
        "unsigned": {"Content-Type": "application/json"},
        "bad signature": signed(body, secret="wrong"),
        "stale": signed(body, timestamp=int(time.time()) - 600),
        "future": signed(body, timestamp=int(time.time()) + 600),
    }[case]
    status, answer = post(receiver, body, headers)
    assert status == 401, answer
    assert "rejected 401" in webhook_log.text


def test_http_refuses_non_json(receiver, webhook_log):
    body = b"<xml>not json</xml>"
    status, answer = post(receiver, body, signed(body))
    assert status == 400 and "bad payload" in answer["detail"]
    assert "rejected 400" in webhook_log.text


def test_http_refuses_oversized_body_without_reading_it(receiver, webhook_log):
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
    assert "rejected 413" in webhook_log.text


def test_emit_failure_answers_502(receiver, webhook_log):
    body = payload()
    headers = signed(body)
    status, answer = post(receiver, body, headers)
    assert status == 502 and "emit failed" in answer["detail"] and "not reachable" in answer["detail"]
    # The retry of a failed delivery is tried again, not treated as a duplicate.
    assert post(receiver, body, headers)[0] == 502
    assert "failed 502" in webhook_log.text


# ---- end to end: a real MLflow server fires the webhook ----------------------------------------------

@pytest.mark.server
def test_mlflow_registration_becomes_a_prefect_event_and_a_transfer_run(tmp_path, monkeypatch, webhook_log,
                                                                        prefect_server, transfer_deployment):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail at once, not after minutes of retries
    from mlflow import MlflowClient

    receiver = serve(make_server("127.0.0.1", 0, SECRET, prefect_server))
    # Same receiver code and secret, but MLflow will sign for it with another secret.
    wrong_receiver = serve(make_server("127.0.0.1", 0, SECRET, prefect_server))
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
        for name, tags in (("base-webhooked", {"base_version": "v2"}), ("adapter-x", {})):
            client.create_registered_model(name)
            client.create_model_version(name, source=f"runs:/{run.info.run_id}/base", run_id=run.info.run_id,
                                        tags=tags)

        def messages():
            return [r.getMessage() for r in webhook_log.records if r.name == "transpeft.webhook"]

        assert wait_until(lambda: any(m.startswith("accepted 202") for m in messages())
                          and any("'adapter-x'" in m for m in messages())
                          and sum("bad signature" in m for m in messages()) == 2), messages()
        assert sum(m.startswith("accepted 202") for m in messages()) == 1
        assert sum(m.startswith("rejected 401") for m in messages()) == 2

        stored = wait_until(lambda: stored_events(prefect_server, event={"name": [BASE_REGISTERED]},
                                                  resource={"id": ["transpeft.base.webhooked.v2"]}))
        assert len(stored) == 1
        assert {k: v for k, v in stored[0]["payload"].items() if k != "delivery_id"} == {
            "fingerprint": None, "mlflow_version": "1", "source": None, "parent": None,
            "registered_model": "base-webhooked", "announced_by": "mlflow-webhook"}

        def transfer_runs():
            runs = prefect_api(prefect_server, "/flow_runs/filter",
                               {"deployments": {"id": {"any_": [transfer_deployment]}}})
            return [r for r in runs if r["parameters"] == {"family": "webhooked", "version": "v2"}]

        assert len(wait_until(transfer_runs)) == 1
    finally:
        mlflow_server.stop()
        for server in (receiver, wrong_receiver):
            stop(server)


@pytest.mark.server
def test_under_load_every_valid_delivery_is_emitted_once_and_a_slow_client_blocks_no_one(live_receiver):
    """200 signed deliveries and 50 bad ones at once, while a client trickles its body a byte a second:
    each valid delivery emitted once, each bad one refused, the trickler cut off at the deadline."""
    import socket

    from transpeft.webhook import BODY_DEADLINE_S

    def trickle() -> tuple[float, bytes]:
        """Send the headers, then a byte a second; (seconds until the receiver answered or hung up, what it said)."""
        started = time.monotonic()
        with socket.create_connection(live_receiver.server_address[:2], timeout=1) as sock:
            sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
            while time.monotonic() - started < 30:
                try:
                    sock.sendall(b"{")
                    return time.monotonic() - started, sock.recv(200)  # waits 1 s for an answer
                except TimeoutError:
                    continue
                except OSError as e:  # reset: the receiver closed with our bytes unread
                    return time.monotonic() - started, repr(e).encode()
        return time.monotonic() - started, b""

    valid = [(body, signed(body)) for body in (payload(name=f"base-load{i}") for i in range(200))]
    bad = [(body, signed(body, secret="wrong")) for body in (payload(name=f"base-bad{i}") for i in range(50))]
    with ThreadPoolExecutor(32) as pool:
        slow = pool.submit(trickle)
        answers = list(pool.map(lambda request: post(live_receiver, *request)[0], valid + bad))
        served_while_trickling = not slow.done()
        cut_after, reply = slow.result()
    assert answers == [202] * 200 + [401] * 50 and served_while_trickling
    assert (b" 408 " in reply or b"ConnectionReset" in reply) and BODY_DEADLINE_S - 2 < cut_after < BODY_DEADLINE_S + 5, \
        (cut_after, reply)
    assert [post(live_receiver, *request)[0] for request in valid[:5]] == [200] * 5  # each was emitted once
