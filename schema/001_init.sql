-- greeksd initial schema: the Greeks timeline and the trades log.

CREATE TABLE greek_snapshots (
    broker             text        NOT NULL,
    account_id         text        NOT NULL,
    contract_key       text        NOT NULL,
    underlying         text        NOT NULL,
    expiration         date        NOT NULL,
    strike             numeric     NOT NULL,
    option_type        char(1)     NOT NULL CHECK (option_type IN ('C', 'P')),
    multiplier         numeric,
    quantity           numeric,
    delta              double precision,
    gamma              double precision,
    theta              double precision,
    vega               double precision,
    rho                double precision,
    implied_volatility double precision,
    underlying_price   double precision,
    bid                double precision,
    ask                double precision,
    last               double precision,
    mark               double precision,
    event_time         timestamptz NOT NULL,
    received_at        timestamptz NOT NULL,
    persisted_at       timestamptz NOT NULL,
    -- hash of the values: two events with the same identity, time and values are one
    -- event (retried batch, replayed fixture); see the writer.
    fingerprint        bigint      NOT NULL,
    source_payload     jsonb
) PARTITION BY RANGE (event_time);

-- A stray timestamp (no daily partition yet) is kept here, never rejected.
CREATE TABLE greek_snapshots_default PARTITION OF greek_snapshots DEFAULT;

CREATE INDEX greek_snapshots_time_idx ON greek_snapshots (event_time DESC);
-- Serves both contract lookups and the duplicate rule.
CREATE UNIQUE INDEX greek_snapshots_contract_idx
    ON greek_snapshots (broker, account_id, contract_key, event_time DESC, fingerprint);

CREATE TABLE trades (
    id              bigserial   PRIMARY KEY,
    broker          text        NOT NULL,
    broker_trade_id text        NOT NULL,
    account_id      text        NOT NULL,
    contract_key    text,
    symbol          text        NOT NULL,
    side            text        NOT NULL CHECK (side IN ('buy', 'sell')),
    quantity        numeric     NOT NULL CHECK (quantity <> 0),
    price           numeric,
    executed_at     timestamptz NOT NULL,
    source          text        NOT NULL DEFAULT 'broker' CHECK (source IN ('broker', 'strategy')),
    note            text,
    source_payload  jsonb,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (broker, broker_trade_id)
);

CREATE INDEX trades_time_idx ON trades (executed_at DESC);
CREATE INDEX trades_contract_idx ON trades (broker, account_id, contract_key, executed_at DESC);
