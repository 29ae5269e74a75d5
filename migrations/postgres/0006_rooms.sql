-- rooms: every room and conversation has its own gapless offsets, its own total order and its
-- own lock. a room's row holds the last offset handed out in it; appenders to one room lock its
-- row (so offsets are assigned in commit order within the room, trap 1 of docs/DESIGN.md), and
-- appenders to different rooms never wait for each other. the default room, the tutorial's chat,
-- is the empty name, which no room name can be. room names compare byte by byte ("C"): that is
-- the code point order conversations are named in, and the cheapest comparison for the keys every
-- append and read goes through.
create table rooms (
    name text collate "C" primary key,
    head bigint not null default 0,
    -- the two people of a conversation ('@' + their names sorted, joined by '|'), so a node can
    -- find the conversations of the people connected to it; null for other rooms
    person_a text,
    person_b text
);
create index rooms_person_a on rooms (person_a) where person_a is not null;
create index rooms_person_b on rooms (person_b) where person_b is not null;
insert into rooms (name, head) select '', head from message_head;

alter table messages rename to room_messages;
alter table room_messages add column room text collate "C" not null default '';
alter table room_messages alter column room drop default;
-- at_ms (0005) holds the time every reader uses; created_at only repeated it, in every row
alter table room_messages drop column created_at;
alter table room_messages drop constraint messages_pkey;
alter table room_messages add primary key (room, id);
-- a message is its room, client offset and content together: the same retry in another room is
-- another message
drop index messages_client_offset_content;
create unique index room_messages_identity on room_messages (room, client_offset, md5(content));

-- what a node of the version before rooms reads, so it keeps serving the default room during a
-- rolling upgrade: its head query and its replay query see the default room only
drop table message_head;
create view message_head as select head from rooms where name = '';
create view messages as
    select id, client_offset, content, to_timestamp(at_ms / 1000.0) as created_at, name, at_ms
    from room_messages where room = '';

-- appends a batch to one room in one round trip. returns, per input position (1-based), the
-- message's offset in the room and whether this call inserted it (false: stored before)
create function chorus_append_to(
    p_room text, p_client_offsets text[], p_contents text[], p_names text[], p_ats bigint[]
)
returns table (o_ord bigint, o_id bigint, o_inserted boolean)
language plpgsql as $$
declare
    v_head bigint;
    v_count bigint;
begin
    -- waits for every earlier appender to this room to commit; reads the head they left. a
    -- room's first append creates its row (two racing creators: the second waits, then locks)
    select r.head into v_head from rooms r where r.name = p_room for update;
    if not found then
        insert into rooms (name, person_a, person_b)
        values (
            p_room,
            case when p_room like '@%' then split_part(substr(p_room, 2), '|', 1) end,
            case when p_room like '@%' then split_part(substr(p_room, 2), '|', 2) end
        )
        on conflict do nothing;
        select r.head into v_head from rooms r where r.name = p_room for update;
    end if;

    -- the fast path of 0004: nothing of the batch was stored before
    insert into room_messages (room, id, client_offset, content, name, at_ms)
    select p_room, v_head + u.ord, u.client_offset, u.content, u.name, u.at_ms
    from unnest(p_client_offsets, p_contents, p_names, p_ats)
         with ordinality as u(client_offset, content, name, at_ms, ord)
    on conflict do nothing;
    get diagnostics v_count = row_count;
    if v_count = cardinality(p_contents) then
        update rooms r set head = v_head + v_count where r.name = p_room;
        return query select g.ord, v_head + g.ord, true from generate_series(1::bigint, v_count) as g(ord);
        return;
    end if;

    -- some were stored before: take back this call's rows (uncommitted, and every appender to
    -- the room waits on its lock) and look each message up
    delete from room_messages m where m.room = p_room and m.id > v_head;
    return query
    with input as (
        select u.ord, u.client_offset, u.content, u.name, u.at_ms
        from unnest(p_client_offsets, p_contents, p_names, p_ats)
             with ordinality as u(client_offset, content, name, at_ms, ord)
    ), known as (
        select i.ord, m.id
        from input i
        join room_messages m on m.room = p_room
                            and m.client_offset = i.client_offset
                            and md5(m.content) = md5(i.content)
                            and m.content = i.content
    ), fresh as (
        select i.ord, i.client_offset, i.content, i.name, i.at_ms,
               v_head + row_number() over (order by i.ord) as id
        from input i
        where not exists (select 1 from known k where k.ord = i.ord)
    ), inserted as (
        insert into room_messages (room, id, client_offset, content, name, at_ms)
        select p_room, f.id, f.client_offset, f.content, f.name, f.at_ms from fresh f
        returning 1
    )
    select k.ord, k.id, false from known k
    union all
    select f.ord, f.id, true from fresh f
    order by 1;

    update rooms r
    set head = coalesce((select max(m.id) from room_messages m where m.room = p_room), 0)
    where r.name = p_room;
end
$$;

-- the functions of the versions before rooms append to the default room, so a node of either
-- version takes the same lock and the offsets stay gapless during a rolling upgrade
create or replace function chorus_append(
    p_client_offsets text[], p_contents text[], p_names text[], p_ats bigint[]
)
returns table (o_ord bigint, o_id bigint, o_inserted boolean)
language sql as $$
    select * from chorus_append_to('', p_client_offsets, p_contents, p_names, p_ats)
$$;

create or replace function chorus_append(p_client_offsets text[], p_contents text[])
returns table (o_ord bigint, o_id bigint, o_inserted boolean)
language sql as $$
    select * from chorus_append_to(
        '',
        p_client_offsets,
        p_contents,
        array_fill('anonymous'::text, array[cardinality(p_contents)]),
        array_fill((extract(epoch from now()) * 1000)::bigint, array[cardinality(p_contents)])
    )
$$;
