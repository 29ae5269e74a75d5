-- a message is its client offset and its content together, not the offset alone: a retry repeats
-- both, while the tutorial's client builds offsets from socket.id, which is undefined while it is
-- disconnected, so messages that different clients queue offline share offsets ("undefined-3").
-- sqlite cannot drop a column's unique constraint, so the table is rebuilt.
create table messages_next (
    id integer primary key,
    client_offset text,
    content text not null,
    created_at text not null default (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
insert into messages_next (id, client_offset, content, created_at)
    select id, client_offset, content, created_at from messages;
drop table messages;
alter table messages_next rename to messages;
create unique index messages_client_offset_content on messages (client_offset, content);
