-- rooms: every room and conversation has its own gapless offsets (see the Postgres migration of
-- the same name). the default room, the tutorial's chat, is the empty name. the one writer takes
-- the database's write lock, so rooms need no lock of their own here.
create table rooms (
    name text primary key,
    head integer not null default 0,
    -- the two people of a conversation, so the conversations of a person can be found
    person_a text,
    person_b text
);
create index rooms_person_a on rooms (person_a) where person_a is not null;
create index rooms_person_b on rooms (person_b) where person_b is not null;
insert into rooms (name, head) select '', coalesce(max(id), 0) from messages;

create table room_messages (
    room text not null,
    id integer not null,
    client_offset text,
    content text not null,
    -- at_ms holds the time every reader uses (created_at of the old table only repeated it)
    name text not null default 'anonymous',
    at_ms integer not null default 0,
    primary key (room, id)
);
insert into room_messages (room, id, client_offset, content, name, at_ms)
    select '', id, client_offset, content, name, at_ms from messages;
drop table messages;
create unique index room_messages_identity on room_messages (room, client_offset, content);
-- the default room as the table was before rooms
create view messages as
    select id, client_offset, content,
           strftime('%Y-%m-%dT%H:%M:%fZ', at_ms / 1000.0, 'unixepoch') as created_at, name, at_ms
    from room_messages where room = '';
