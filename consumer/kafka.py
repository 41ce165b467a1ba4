"""Kafka client settings shared by every consumer, producer and admin client.

`client_args` turns the ABSENCE_SYNC_KAFKA_* security settings into aiokafka
keyword arguments, so the live intake, a resync, `status` and `dlq show`
reach a secured cluster (TLS, SASL PLAIN or SCRAM) the same way.
"""

from __future__ import annotations

import ssl
from typing import Any

from consumer.logs import register_secret_value
from consumer.settings import Settings


def ssl_context(settings: Settings) -> ssl.SSLContext:
    """Verified TLS to the brokers: the system store plus ABSENCE_SYNC_KAFKA_CA_FILE,
    and the client certificate when one is configured."""
    context = ssl.create_default_context()
    if settings.kafka_ca_file is not None:
        context.load_verify_locations(cafile=str(settings.kafka_ca_file))
    if settings.kafka_cert_file is not None and settings.kafka_key_file is not None:
        context.load_cert_chain(str(settings.kafka_cert_file), str(settings.kafka_key_file))
    return context


def sasl_password(settings: Settings) -> str | None:
    if settings.kafka_sasl_password:
        return settings.kafka_sasl_password
    if settings.kafka_sasl_password_file is not None:
        password = settings.kafka_sasl_password_file.read_text(encoding="utf-8").strip()
        return register_secret_value(password)
    return None


#: how often clients refresh cluster metadata: a topic created after the worker
#: started (on a cluster where the worker does not create topics) is consumed
#: within this delay, instead of aiokafka's default five minutes
METADATA_MAX_AGE_MS = 30_000


def client_args(settings: Settings, bootstrap: str) -> dict[str, Any]:
    """Keyword arguments for AIOKafkaConsumer, AIOKafkaProducer and AIOKafkaAdminClient."""
    protocol = settings.kafka_security_protocol
    args: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "security_protocol": protocol,
        "metadata_max_age_ms": METADATA_MAX_AGE_MS,
    }
    if protocol in ("SSL", "SASL_SSL"):
        args["ssl_context"] = ssl_context(settings)
    if protocol.startswith("SASL_"):
        args["sasl_mechanism"] = settings.kafka_sasl_mechanism
        args["sasl_plain_username"] = settings.kafka_sasl_username
        args["sasl_plain_password"] = sasl_password(settings)
    return args
