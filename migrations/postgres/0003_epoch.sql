-- names this database's history. the Redis stream that caches recent messages is keyed by it, so
-- a stream written for another database, or for this one before it was recreated, is never read
create table chorus_meta (
    singleton boolean primary key default true check (singleton),
    epoch text not null
);
insert into chorus_meta (singleton, epoch) values (true, gen_random_uuid()::text);
