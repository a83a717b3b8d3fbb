-- persisted_at is stamped by the server as each row is written (COPY included), so the
-- writer can COPY straight into greek_snapshots instead of going through a staging
-- table on every batch.
ALTER TABLE greek_snapshots ALTER COLUMN persisted_at SET DEFAULT clock_timestamp();
