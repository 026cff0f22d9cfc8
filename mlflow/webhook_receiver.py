"""Launch the MLflow webhook receiver (the logic is transpeft/webhook.py).

    TRANSPEFT_WEBHOOK_SECRET=s3cret python mlflow/webhook_receiver.py --port 5055 \
        [--prefect-api-url http://127.0.0.1:4200/api] [--prefix base-] [--host 127.0.0.1]

then register it once in MLflow (the server needs the webhook settings of mlflow/server.env):

    MlflowClient("http://127.0.0.1:5000").create_webhook(
        name="transpeft-base-registered", url="http://127.0.0.1:5055/",
        events=["model_version.created"], secret="s3cret")

A new version of a registered model named `<prefix><family>` becomes a `transpeft.base.registered`
Prefect event, which starts `transfer-on-base-update/all-adapters` for that family and version;
unsigned or badly signed deliveries are refused with 401, and a delivery whose event Prefect did not
take is answered 502, so MLflow retries it.
"""

import argparse
import logging
import os
import sys

from transpeft.auth import from_files
from transpeft.events import DEFAULT_PREFECT_API_URL, EventNotDelivered, check_reachable
from transpeft.webhook import make_server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5055)
    parser.add_argument("--prefect-api-url", help="Prefect API the events go to "
                                                  f"(default: $PREFECT_API_URL, else {DEFAULT_PREFECT_API_URL})")
    parser.add_argument("--prefix", default="base-", help="registered-model name prefix of base families")
    args = parser.parse_args()
    from_files()  # PREFECT_API_AUTH_STRING_FILE: the events go to a locked Prefect server
    secret = os.environ.get("TRANSPEFT_WEBHOOK_SECRET", "")
    if not secret:
        parser.error("set TRANSPEFT_WEBHOOK_SECRET to the secret given to MLflow's create_webhook")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("transpeft.webhook")
    server = make_server(args.host, args.port, secret, args.prefect_api_url, args.prefix)
    try:
        check_reachable(server.api_url)
    except EventNotDelivered as e:  # deliveries get 502 (and MLflow retries) until Prefect is up
        log.warning("%s", e)
    log.info("listening on %s, emitting events to %s", server.url, server.api_url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
