"""Dispatch (docs/guarantees.md): pending work -> providers, in batches, within limits.

The parts, each doing one thing and tested alone:

* `scheduler.Dispatcher`: leases due work in batches, keeps the slots and the
  per-tenant limit, renews leases while work runs, drains on stop;
* `executor.Executor`: a batch -> render and plan (pure) -> provider calls ->
  outcomes recorded in one statement, adoption of creates in doubt included;
* `providers.ProviderCache`: one provider per configuration, by revision;
* `limits.KeyedLimiter`: the one limiter for tenants and mailboxes, and
  `limits.MailboxLeases`: a mailbox leased to one replica at a time.
"""

from consumer.dispatch.executor import (
    INTERNAL_ERROR_HINT,
    Executor,
    Job,
    LeaseClock,
    RetryPolicy,
    transaction_id,
)
from consumer.dispatch.limits import KeyedLimiter, MailboxLeases, mailbox_key
from consumer.dispatch.providers import ProviderCache, ProviderFactory, Resolved
from consumer.dispatch.scheduler import Dispatcher

__all__ = [
    "INTERNAL_ERROR_HINT",
    "Dispatcher",
    "Executor",
    "Job",
    "KeyedLimiter",
    "LeaseClock",
    "MailboxLeases",
    "ProviderCache",
    "ProviderFactory",
    "Resolved",
    "RetryPolicy",
    "mailbox_key",
    "transaction_id",
]
