-- every message carries its sender's name and the time it was accepted (milliseconds since the
-- Unix epoch); rows stored before have no sender ("anonymous") and their created_at as their time
alter table messages add column name text not null default 'anonymous';
alter table messages add column at_ms integer not null default 0;
update messages set at_ms = cast((julianday(created_at) - 2440587.5) * 86400000 as integer);
