"""Launch the MLflow webhook receiver (the logic is transpeft/webhook.py).

    TRANSPEFT_WEBHOOK_SECRET=s3cret python mlflow/webhook_receiver.py --port 5055 \
        --forward-url http://127.0.0.1:4200/notify [--prefix base-] [--host 127.0.0.1]

then register it once in MLflow (the server needs the webhook settings of mlflow/server.env):

    MlflowClient("http://127.0.0.1:5000").create_webhook(
        name="transpeft-base-registered", url="http://127.0.0.1:5055/",
        events=["model_version.created"], secret="s3cret")

Deliveries for registered models named `<prefix><family>` are forwarded as a
`transpeft.base.registered` notice; unsigned or badly signed ones are refused with 401.
"""

import argparse
import logging
import os
import sys

from transpeft.webhook import make_server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5055)
    parser.add_argument("--forward-url", required=True, help="where base-registered notices are POSTed")
    parser.add_argument("--prefix", default="base-", help="registered-model name prefix of base families")
    args = parser.parse_args()
    secret = os.environ.get("TRANSPEFT_WEBHOOK_SECRET", "")
    if not secret:
        parser.error("set TRANSPEFT_WEBHOOK_SECRET to the secret given to MLflow's create_webhook")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = make_server(args.host, args.port, secret, args.forward_url, args.prefix)
    logging.getLogger("transpeft.webhook").info("listening on %s, forwarding to %s", server.url, args.forward_url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
