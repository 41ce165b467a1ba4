-- iCalendar feeds of `ics` configurations (docs/rendering.md, "Feeds").

-- A feed link is shown once and stored only as the SHA-256 of its token.
-- `employee` is the lower-cased e-mail of a personal feed; NULL for the
-- configuration's team feed.
CREATE TABLE feed_tokens (
    id           text PRIMARY KEY,
    config_id    text NOT NULL REFERENCES sync_configs (id) ON DELETE CASCADE,
    tenant       text NOT NULL,
    employee     text,
    name         text,
    hash         text NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz
);
CREATE INDEX feed_tokens_config ON feed_tokens (config_id, created_at);

-- A personal feed reads one employee's absences, never the whole tenant's.
CREATE INDEX absences_employee_email
    ON absences (tenant, lower(btrim(data #>> '{employee,email}')), end_date)
    WHERE NOT deleted;
-- A team feed reads the tenant's absences that end inside its window.
CREATE INDEX absences_tenant_end
    ON absences (tenant, end_date) INCLUDE (version)
    WHERE NOT deleted;
