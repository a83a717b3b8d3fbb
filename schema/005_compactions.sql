-- Daily partitions whose indexes the partition keeper (or `greeksd replay`) rebuilt
-- packed once no longer written (greeksd.store.compaction): each is compacted once.
-- A plain new table: nothing existing is locked or rewritten.
CREATE TABLE greek_snapshots_compactions (
    partition     text        PRIMARY KEY,
    compacted_at  timestamptz NOT NULL DEFAULT now(),
    rows_estimate bigint      NOT NULL, -- pg_class.reltuples when compacted
    index_bytes_before bigint NOT NULL,
    index_bytes_after  bigint NOT NULL
);
