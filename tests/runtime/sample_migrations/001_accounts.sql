CREATE TABLE accounts (
    id text PRIMARY KEY,
    balance NUMERIC(48, 24) NOT NULL CHECK (balance >= 0)
);
