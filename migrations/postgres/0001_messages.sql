-- the chat log: one row per stored message; id is the serverOffset clients see
create table messages (
    id bigint primary key,
    -- set by clients that retry (tutorial step 8); null for the older step that sends none
    client_offset text unique,
    content text not null,
    created_at timestamptz not null default now()
);

-- one row holding the last id handed out. appenders lock it, so ids are assigned in commit
-- order and the visible ids are always a gapless prefix (a sequence would not give either)
create table message_head (
    singleton boolean primary key default true check (singleton),
    head bigint not null
);
insert into message_head (singleton, head) values (true, 0);

-- appends a batch in one round trip. returns, per input position (1-based), the message's id
-- and whether this call inserted it (false: a client offset stored before)
create function chorus_append(p_client_offsets text[], p_contents text[])
returns table (o_ord bigint, o_id bigint, o_inserted boolean)
language plpgsql as $$
declare
    v_head bigint;
begin
    -- waits for every earlier appender to commit; reads the head they left
    select h.head into v_head from message_head h where h.singleton for update;

    return query
    with input as (
        select u.ord, u.client_offset, u.content
        from unnest(p_client_offsets, p_contents) with ordinality as u(client_offset, content, ord)
    ), known as (
        select i.ord, m.id
        from input i
        join messages m on m.client_offset = i.client_offset
    ), fresh as (
        select i.ord, i.client_offset, i.content,
               v_head + row_number() over (order by i.ord) as id
        from input i
        where not exists (select 1 from known k where k.ord = i.ord)
    ), inserted as (
        insert into messages (id, client_offset, content)
        select f.id, f.client_offset, f.content from fresh f
        returning 1
    )
    select k.ord, k.id, false from known k
    union all
    select f.ord, f.id, true from fresh f
    order by 1;

    update message_head h
    set head = coalesce((select max(m.id) from messages m), 0)
    where h.singleton;
end
$$;
