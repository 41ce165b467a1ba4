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
-- (A team feed reads its tenant's rows through the primary key: an index on
-- the end date would cost every recorded absence more than it saves a feed.)
CREATE INDEX absences_employee_email
    ON absences (tenant, lower(btrim(data #>> '{employee,email}')))
    WHERE NOT deleted;
