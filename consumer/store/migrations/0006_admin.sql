-- Administration: per-tenant API tokens, the mailbox of each logged write
-- (health is judged per mailbox), and configurations being deleted with
-- their calendar events.

-- A token is shown once and stored only as the SHA-256 of its text.
CREATE TABLE api_tokens (
    id           text PRIMARY KEY,
    tenant       text NOT NULL,
    role         text NOT NULL CHECK (role IN ('read', 'manage', 'configure')),
    name         text,
    hash         text NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked      boolean NOT NULL DEFAULT false
);
CREATE INDEX api_tokens_tenant ON api_tokens (tenant);

ALTER TABLE sync_log ADD COLUMN mailbox text;

-- Set by `DELETE /api/v1/syncs/{id}?purge=true`: the configuration wants no
-- event any more; it is removed once its calendars hold none of its events.
ALTER TABLE sync_configs ADD COLUMN purge_requested_at timestamptz;
