-- names this database's history (see the Postgres migration of the same name)
create table chorus_meta (
    singleton integer primary key check (singleton = 1),
    epoch text not null
);
insert into chorus_meta (singleton, epoch) values (1, lower(hex(randomblob(16))));
