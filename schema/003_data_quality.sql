-- Whether a row's market data was live, delayed or frozen (IBKR field 6509: D delayed,
-- Z/Y frozen, R realtime); NULL when the broker does not say (DXLink rows). A delayed or
-- frozen row's event_time is the push time, not a quote time: never mistake it for live.
-- Adding a nullable column to the partitioned parent is metadata-only and reaches every
-- partition, present and future. The check is NOT VALID so that no existing row (all
-- NULL anyway) is scanned under the migration's lock; every new row is checked.
ALTER TABLE greek_snapshots ADD COLUMN market_data text;
ALTER TABLE greek_snapshots
    ADD CONSTRAINT greek_snapshots_market_data_check
    CHECK (market_data IN ('live', 'delayed', 'frozen')) NOT VALID;
