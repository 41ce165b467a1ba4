-- absence-sync initial schema.

CREATE TABLE sync_configs (
    id              text PRIMARY KEY,
    tenant          text NOT NULL,
    provider        text NOT NULL,
    settings        jsonb NOT NULL,          -- every field but secrets
    secrets         bytea,                   -- Fernet token of a JSON object, or NULL
    render_hash     text NOT NULL,           -- hash of the fields that change rendering
    revision        bigint NOT NULL DEFAULT 1,
    granted_tenant_id text,                  -- Microsoft 365 directory id from admin consent
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX sync_configs_tenant ON sync_configs (tenant);

-- The latest known state of each absence.
CREATE TABLE absences (
    tenant      text NOT NULL,
    id          text NOT NULL,
    version     bigint NOT NULL,
    deleted     boolean NOT NULL,
    data        jsonb NOT NULL,
    event_time  timestamptz,
    end_date    date,
    establishment_id text,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, id)
);

-- Per (configuration, absence): wanted state and what was written.
-- Work is pending while change_seq > done_seq.
CREATE TABLE sync_items (
    config_id        text NOT NULL REFERENCES sync_configs (id) ON DELETE CASCADE,
    tenant           text NOT NULL,
    absence_id       text NOT NULL,
    change_seq       bigint NOT NULL DEFAULT 1,
    done_seq         bigint NOT NULL DEFAULT 0,
    force            boolean NOT NULL DEFAULT false,
    wanted           boolean,
    desired_hash     text,
    applied_hash     text,
    event_id         text,
    mailbox          text,
    generation       bigint NOT NULL DEFAULT 0,
    intent           text,                   -- 'create' while a create may be in flight
    status           text NOT NULL DEFAULT 'pending',  -- pending|synced|failed|deleted
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    lease_until      timestamptz,
    first_failure_at timestamptz,
    last_error_code  text,
    last_error_message text,
    last_error_hint  text,
    pending_since    timestamptz NOT NULL DEFAULT now(),
    event_time       timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    synced_at        timestamptz,
    PRIMARY KEY (config_id, absence_id)
);
CREATE INDEX sync_items_due ON sync_items (next_attempt_at)
    WHERE change_seq > done_seq;
CREATE INDEX sync_items_tenant ON sync_items (tenant, absence_id);
CREATE INDEX sync_items_status ON sync_items (config_id, status);

-- A bounded history of calendar operations, for the monitoring view.
CREATE TABLE sync_log (
    id          bigserial PRIMARY KEY,
    config_id   text NOT NULL,
    absence_id  text NOT NULL,
    operation   text NOT NULL,
    outcome     text NOT NULL,
    error_code  text,
    message     text,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX sync_log_config ON sync_log (config_id, at DESC);

-- Admin-consent requests waiting for their redirect.
CREATE TABLE consent_states (
    state       text PRIMARY KEY,
    config_id   text NOT NULL REFERENCES sync_configs (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now()
);
