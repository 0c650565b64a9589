-- A pot never holds more than was credited to it: what it gave to sub-allocations or returned
-- to the program pool is the (non-negative) rest.
ALTER TABLE grants
    ADD CONSTRAINT grants_within_credit CHECK (available + held + consumed <= credited);
ALTER TABLE allocations
    ADD CONSTRAINT allocations_within_credit CHECK (available + held + consumed <= credited);
