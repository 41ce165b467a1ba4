-- Bounded storage: the trim job deletes sync_log rows by age and keeps the
-- newest rows of each (configuration, absence); these indexes serve both.
CREATE INDEX sync_log_at ON sync_log (at);
CREATE INDEX sync_log_item ON sync_log (config_id, absence_id, id);

-- When a fleet-wide job last finished, so that replicas take turns instead of
-- each repeating it.
CREATE TABLE maintenance_runs (
    job         text PRIMARY KEY,
    finished_at timestamptz NOT NULL
);
