-- every message carries its sender's name and the time it was accepted (milliseconds since the
-- Unix epoch, the node's clock), sent to clients as the third argument of `chat message`.
-- rows stored before have no sender ("anonymous") and their created_at as their time.
alter table messages add column name text not null default 'anonymous';
alter table messages add column at_ms bigint;
update messages set at_ms = (extract(epoch from created_at) * 1000)::bigint;
alter table messages alter column at_ms set default (extract(epoch from now()) * 1000)::bigint;
alter table messages alter column at_ms set not null;

-- chorus_append with names and times. the two-argument function of 0004 stays, so a node of the
-- previous version keeps appending during a rolling upgrade (its rows get the defaults above).
create function chorus_append(
    p_client_offsets text[], p_contents text[], p_names text[], p_ats bigint[]
)
returns table (o_ord bigint, o_id bigint, o_inserted boolean)
language plpgsql as $$
declare
    v_head bigint;
    v_count bigint;
begin
    -- waits for every earlier appender to commit; reads the head they left
    select h.head into v_head from message_head h where h.singleton for update;

    -- the fast path of 0004: nothing of the batch was stored before
    insert into messages (id, client_offset, content, name, at_ms)
    select v_head + u.ord, u.client_offset, u.content, u.name, u.at_ms
    from unnest(p_client_offsets, p_contents, p_names, p_ats)
         with ordinality as u(client_offset, content, name, at_ms, ord)
    on conflict do nothing;
    get diagnostics v_count = row_count;
    if v_count = cardinality(p_contents) then
        update message_head h set head = v_head + v_count where h.singleton;
        return query select g.ord, v_head + g.ord, true from generate_series(1::bigint, v_count) as g(ord);
        return;
    end if;

    delete from messages m where m.id > v_head;
    return query
    with input as (
        select u.ord, u.client_offset, u.content, u.name, u.at_ms
        from unnest(p_client_offsets, p_contents, p_names, p_ats)
             with ordinality as u(client_offset, content, name, at_ms, ord)
    ), known as (
        select i.ord, m.id
        from input i
        join messages m on m.client_offset = i.client_offset
                       and md5(m.content) = md5(i.content)
                       and m.content = i.content
    ), fresh as (
        select i.ord, i.client_offset, i.content, i.name, i.at_ms,
               v_head + row_number() over (order by i.ord) as id
        from input i
        where not exists (select 1 from known k where k.ord = i.ord)
    ), inserted as (
        insert into messages (id, client_offset, content, name, at_ms)
        select f.id, f.client_offset, f.content, f.name, f.at_ms from fresh f
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
