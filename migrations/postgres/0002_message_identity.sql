-- a message is its client offset and its content together, not the offset alone: a retry repeats
-- both, while the tutorial's client builds offsets from socket.id, which is undefined while it is
-- disconnected, so messages that different clients queue offline share offsets ("undefined-3").
-- appenders are serialized by the message_head lock; the unique index is the backstop.
alter table messages drop constraint messages_client_offset_key;
create unique index messages_client_offset_content on messages (client_offset, md5(content));

create or replace function chorus_append(p_client_offsets text[], p_contents text[])
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
        join messages m on m.client_offset = i.client_offset and m.content = i.content
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
