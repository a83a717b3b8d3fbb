-- Which source (stream) received a row and which instance wrote it: one database may
-- serve several collectors (instances), each running several sources (`ibkr`,
-- `ibkr:alice`, `tastytrade:main`). Both are nullable: rows written before this
-- migration say nothing, and adding a nullable column to the partitioned parent is
-- metadata-only and reaches every partition, present and future. Neither is part of the
-- unique key (the fingerprint covers values only), so two collectors streaming the same
-- account still store a row once: the first to commit names itself.
ALTER TABLE greek_snapshots ADD COLUMN source text, ADD COLUMN instance text;
