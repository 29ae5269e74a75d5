-- the chat log: one row per stored message; id is the serverOffset clients see
create table messages (
    id integer primary key,
    -- set by clients that retry (tutorial step 8); null for the older step that sends none
    client_offset text unique,
    content text not null,
    created_at text not null default (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
