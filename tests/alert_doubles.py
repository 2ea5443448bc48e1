"""Alert receivers for tests: a local Slack-style webhook (http.server) and a moto SNS topic."""

from __future__ import annotations

import json
import socket
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from services.adapters import alerts


class _NoDelayServer(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self):
        super().server_bind()
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class WebhookReceiver:
    """Records every JSON body posted to it. `hang` blocks each request until released; `fail_next`
    answers that many requests with HTTP 500 first."""

    def __init__(self):
        self.bodies: list[dict] = []
        self.requests = 0
        self.fail_next = 0
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests += 1
                receiver.entered.set()
                receiver.release.wait(60)
                if receiver.fail_next:
                    receiver.fail_next -= 1
                    self.send_response(500)
                else:
                    receiver.bodies.append(json.loads(body))
                    self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = _NoDelayServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/T000/B000/secret-path"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def hang(self) -> None:
        self.release.clear()

    def events(self) -> list[str]:
        return [b["alert"]["event"] for b in self.bodies]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook():
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


@contextmanager
def installed(alerter: alerts.Alerter):
    """The process's alerter for the duration of a block (the hooks in other modules use it)."""
    previous = alerts.configure(alerter)
    try:
        yield alerter
    finally:
        alerter.close(timeout=1)
        alerts.configure(previous)


class SnsTopic:
    """A moto SNS topic with an SQS queue subscribed: what was published, read back as a subscriber sees it."""

    def __init__(self, region: str = "us-east-1"):
        import boto3

        self.sns = boto3.client("sns", region_name=region)
        self.sqs = boto3.client("sqs", region_name=region)
        self.arn = self.sns.create_topic(Name="ops-alerts")["TopicArn"]
        self.queue_url = self.sqs.create_queue(QueueName="ops-alerts-inbox")["QueueUrl"]
        queue_arn = self.sqs.get_queue_attributes(QueueUrl=self.queue_url, AttributeNames=["QueueArn"])[
            "Attributes"]["QueueArn"]
        self.sns.subscribe(TopicArn=self.arn, Protocol="sqs", Endpoint=queue_arn)

    def messages(self) -> list[dict]:
        out: list[dict] = []
        while True:
            got = self.sqs.receive_message(QueueUrl=self.queue_url, MaxNumberOfMessages=10).get("Messages", [])
            if not got:
                return out
            out += [json.loads(m["Body"]) for m in got]
            self.sqs.delete_message_batch(QueueUrl=self.queue_url, Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(got)])


@pytest.fixture
def sns_topic(monkeypatch):
    from moto import mock_aws

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        yield SnsTopic()
