-- Batch resync and replay (README "Resync and replay").

-- One row per real (not dry) resync: its request, progress and outcome, so the
-- HTTP API can report a background job and an operator can see what ran.
CREATE TABLE resync_jobs (
    id              text PRIMARY KEY,
    tenant          text,                    -- NULL when one run spans several tenants (CLI)
    config_ids      text[] NOT NULL,
    request         jsonb NOT NULL,
    state           text NOT NULL DEFAULT 'running'
                    CHECK (state IN ('running', 'succeeded', 'failed')),
    phase           text NOT NULL DEFAULT 'starting',
    records_read    bigint NOT NULL DEFAULT 0,
    records_total   bigint NOT NULL DEFAULT 0,
    in_scope        bigint NOT NULL DEFAULT 0,
    marked          bigint NOT NULL DEFAULT 0,
    written         bigint NOT NULL DEFAULT 0,
    unchanged       bigint NOT NULL DEFAULT 0,
    failed          bigint NOT NULL DEFAULT 0,
    summary         jsonb,
    error           text,
    -- renewed by the process running the job; a job whose lease ran out was
    -- abandoned (its process died) and blocks nobody
    lease_until     timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz
);
CREATE INDEX resync_jobs_tenant ON resync_jobs (tenant, created_at DESC);

-- At most one running resync per configuration: the primary key is the rule.
CREATE TABLE resync_locks (
    config_id   text PRIMARY KEY REFERENCES sync_configs (id) ON DELETE CASCADE,
    job_id      text NOT NULL REFERENCES resync_jobs (id) ON DELETE CASCADE
);
CREATE INDEX resync_locks_job ON resync_locks (job_id);

-- Which resync last marked a pair, at which change_seq, and what became of
-- that write (written | unchanged | failed; NULL while not done).
ALTER TABLE sync_items
    ADD COLUMN resync_job text,
    ADD COLUMN resync_seq bigint,
    ADD COLUMN resync_outcome text;
CREATE INDEX sync_items_resync ON sync_items (resync_job) WHERE resync_job IS NOT NULL;

-- The outcome is taken the moment the dispatcher records the marked change as
-- done (done_seq reaches resync_seq), whatever process did it: a failure
-- leaves an error code, a write moves synced_at, a no-op moves neither. Later
-- changes of the pair do not overwrite it.
CREATE FUNCTION sync_items_resync_outcome() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.resync_outcome := CASE
        WHEN NEW.last_error_code IS NOT NULL THEN 'failed'
        WHEN NEW.synced_at IS DISTINCT FROM OLD.synced_at THEN 'written'
        ELSE 'unchanged'
    END;
    RETURN NEW;
END;
$$;

CREATE TRIGGER sync_items_resync_outcome
    BEFORE UPDATE ON sync_items
    FOR EACH ROW
    WHEN (NEW.resync_seq IS NOT NULL AND NEW.resync_outcome IS NULL
          AND NEW.done_seq >= NEW.resync_seq AND OLD.done_seq < NEW.resync_seq)
    EXECUTE FUNCTION sync_items_resync_outcome();
