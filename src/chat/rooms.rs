//! Rooms and private messages from clients: `join`, `leave`, `room message`,
//! `private message`, and presence's `who` and `typing` (SPEC, "Rooms and people").

use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;
use socketioxide::{
    adapter::Adapter,
    extract::{AckSender, SocketRef, TryData},
};

use super::{
    Chat, JOIN, LEAVE, PRIVATE_MESSAGE, ROOM_MESSAGE,
    messages::{Ack, EventArgs, InputError, Sender, reject},
    presence::{self, TYPING, WHO},
};
use crate::{
    config::History,
    rooms::{Room, recipient},
    store::ANONYMOUS,
};

/// Registers the rooms' events on an admitted socket, whose sends `sender` holds to its limits.
pub(super) fn wire<A: Adapter>(socket: &SocketRef<A>, chat: &Arc<Chat>, sender: &Arc<Sender>) {
    wire_presence(socket, chat, sender);
    let (for_join, joiner) = (chat.clone(), sender.clone());
    socket.on(
        JOIN,
        move |socket: SocketRef<A>, TryData(args): TryData<EventArgs>, ack: AckSender<A>| {
            // Checked and counted here, before the handler returns, so a send the client
            // pipelines right after its join finds it a member.
            let args = args.map(|a| a.0).unwrap_or_default();
            let joining = start_join(&socket, &args, &for_join, &joiner);
            let (chat, sender) = (for_join.clone(), joiner.clone());
            async move {
                match joining {
                    Ok(joining) => finish_join(socket, joining, ack, &chat, &sender).await,
                    Err(error) => reject(ack, &error, &chat.metrics),
                }
            }
        },
    );

    let (for_leave, leaver) = (chat.clone(), sender.clone());
    socket.on(
        LEAVE,
        move |socket: SocketRef<A>, TryData(args): TryData<EventArgs>, ack: AckSender<A>| {
            let args = args.map(|a| a.0).unwrap_or_default();
            // Left here, before the handler returns, so a send pipelined after it is refused.
            let left = on_leave(&socket, &args, &for_leave, &leaver);
            let (chat, name) = (for_leave.clone(), leaver.name.clone());
            async move {
                #[derive(Serialize)]
                struct Left<'a> {
                    room: &'a str,
                }
                match left {
                    Ok((room, was_in)) => {
                        // Presence first, as for a join.
                        if was_in {
                            chat.presence.exit(&socket, &room, &name).await;
                        }
                        if let Err(error) = ack.send(&(None::<()>, Left { room: room.key() })) {
                            tracing::debug!(socket = %socket.id, error = ?error, "leave ack not sent");
                        }
                    }
                    Err(error) => reject(ack, &error, &chat.metrics),
                }
            }
        },
    );

    let (for_room, room_sender) = (chat.clone(), sender.clone());
    socket.on(
        ROOM_MESSAGE,
        move |socket: SocketRef<A>, TryData(args): TryData<EventArgs>, ack: AckSender<A>| {
            let args = args.map(|a| a.0).unwrap_or_default();
            let room = Room::from_arg(args.first()).map_err(InputError::from);
            let queued = room.clone().and_then(|room| {
                room_sender.queue(room, args.get(1..).unwrap_or_default(), &for_room)
            });
            // The shape of a success ack; a refusal is acked with its error instead.
            let shape = Ack::Room(room.unwrap_or_else(|_| Room::default_room()));
            room_sender.answer_when_stored(socket, ack, queued, shape, &for_room)
        },
    );

    let (for_private, private_sender) = (chat.clone(), sender.clone());
    socket.on(
        PRIVATE_MESSAGE,
        move |socket: SocketRef<A>, TryData(args): TryData<EventArgs>, ack: AckSender<A>| {
            let args = args.map(|a| a.0).unwrap_or_default();
            let room = conversation_with(args.first(), &private_sender);
            let queued = room.clone().and_then(|room| {
                private_sender.queue(room, args.get(1..).unwrap_or_default(), &for_private)
            });
            // The shape of a success ack; a refusal is acked with its error instead.
            let shape = Ack::Room(room.unwrap_or_else(|_| Room::default_room()));
            private_sender.answer_when_stored(socket, ack, queued, shape, &for_private)
        },
    );
}

/// Registers `who` and `typing`.
fn wire_presence<A: Adapter>(socket: &SocketRef<A>, chat: &Arc<Chat>, sender: &Arc<Sender>) {
    let (for_who, asker) = (chat.clone(), sender.clone());
    socket.on(
        WHO,
        move |socket: SocketRef<A>, TryData(args): TryData<EventArgs>, ack: AckSender<A>| {
            let args = args.map(|a| a.0).unwrap_or_default();
            let (chat, sender) = (for_who.clone(), asker.clone());
            let room = asker.take_rate(&for_who).and_then(|()| {
                let room = Room::from_arg(args.first())?;
                if sender.may_send_to(&room) {
                    Ok(room)
                } else {
                    Err(InputError::NotAMember(room.key().to_owned()))
                }
            });
            async move {
                #[derive(Serialize)]
                struct People<'a> {
                    room: Option<&'a str>,
                    people: Vec<String>,
                }
                let room = match room {
                    Ok(room) => room,
                    Err(error) => {
                        reject(ack, &error, &chat.metrics);
                        sender.disconnect_if_abusive(&socket, &error, &chat.limits);
                        return;
                    }
                };
                match chat.presence.who(&socket, &room).await {
                    Ok(people) => {
                        let answer = People {
                            room: room.to_arg(),
                            people,
                        };
                        if let Err(error) = ack.send(&(None::<()>, answer)) {
                            tracing::debug!(error = ?error, "who ack not sent");
                        }
                    }
                    // The cluster did not answer: no ack, the client may ask again.
                    Err(error) => tracing::warn!(error = %error, %room, "who unanswered"),
                }
            }
        },
    );

    let (for_typing, typist) = (chat.clone(), sender.clone());
    socket.on(
        TYPING,
        move |socket: SocketRef<A>, TryData(args): TryData<EventArgs>, ack: AckSender<A>| {
            let args = args.map(|a| a.0).unwrap_or_default();
            let checked = check_typing(&args, &typist);
            let name = typist.name.clone();
            let metrics = for_typing.metrics.clone();
            async move {
                let (room, typing) = match checked {
                    Ok(checked) => checked,
                    Err(error) => {
                        reject(ack, &error, &metrics);
                        return;
                    }
                };
                if let Err(error) = ack.send(&None::<()>) {
                    tracing::trace!(error = ?error, "typing ack not sent");
                }
                #[derive(Serialize)]
                struct Typing<'a>(Option<&'a str>, &'a str, bool);
                let to = match room.people() {
                    Some((a, b)) => vec![presence::person(a), presence::person(b)],
                    None => vec![presence::members(&room)],
                };
                let event = Typing(room.to_arg(), &name, typing);
                if let Err(error) = socket.to(to).emit(TYPING, &event).await {
                    tracing::debug!(error = %error, %room, "typing not sent");
                }
            }
        },
    );
}

/// Checks `typing(room, typing)`: its own rate, a room the socket is in, a boolean.
fn check_typing(args: &[Value], sender: &Sender) -> Result<(Room, bool), InputError> {
    if sender.typing.check().is_err() {
        return Err(InputError::TooFast);
    }
    let room = Room::from_arg(args.first())?;
    if !sender.may_send_to(&room) {
        return Err(InputError::NotAMember(room.key().to_owned()));
    }
    match args.get(1) {
        Some(Value::Bool(typing)) => Ok((room, *typing)),
        _ => Err(InputError::NotTyping),
    }
}

/// The conversation of the sender with the recipient a `private message` names.
fn conversation_with(to: Option<&Value>, sender: &Sender) -> Result<Room, InputError> {
    let me = sender.person().ok_or(InputError::Nameless)?;
    let to = recipient(to)?;
    if to == me || to == ANONYMOUS {
        return Err(InputError::BadRecipient(format!(
            "cannot send a private message to {to}"
        )));
    }
    Ok(Room::conversation(me, &to))
}

/// The offset a `join` resumes after: `None` for the room's newest history.
fn join_offset(arg: Option<&Value>) -> Result<Option<i64>, InputError> {
    match arg {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(n) if n >= 0 => Ok(Some(n)),
            _ => Err(InputError::BadOffset(format!(
                "lastOffset must be a non-negative integer or null, got {n}"
            ))),
        },
        Some(_) => Err(InputError::BadOffset(
            "lastOffset must be a non-negative integer or null".to_owned(),
        )),
    }
}

/// Where a socket starts in a room whose newest offset is `head`, given the offset it asked to
/// resume after (`None`: the newest history).
pub(super) fn start_after(requested: Option<i64>, head: i64, history: History) -> i64 {
    match (requested, history) {
        (Some(after), _) => after,
        (None, History::Unlimited) => 0,
        (None, History::Last(n)) => head
            .saturating_sub(i64::try_from(n).unwrap_or(i64::MAX))
            .max(0),
    }
}

/// A join checked and counted, whose subscription is still to come.
struct Joining {
    room: Room,
    /// The offset it resumes after; `None` for the newest history.
    requested: Option<i64>,
    /// Whether this join added the room to the socket's rooms (so a failure takes it out).
    added: bool,
}

/// The first half of `join(room, lastOffset)`: takes from the rate, checks the arguments and
/// makes the socket a member of the room for its sends.
fn start_join<A: Adapter>(
    socket: &SocketRef<A>,
    args: &[Value],
    chat: &Chat,
    sender: &Sender,
) -> Result<Joining, InputError> {
    let checked = sender.take_rate(chat).and_then(|()| {
        let room = Room::from_arg(args.first())?;
        let requested = join_offset(args.get(1))?;
        if room.is_conversation() && !sender.person().is_some_and(|p| room.has_person(p)) {
            return Err(InputError::NotAMember(room.key().to_owned()));
        }
        Ok((room, requested))
    });
    let (room, requested) = checked.inspect_err(|error| {
        sender.disconnect_if_abusive(socket, error, &chat.limits);
    })?;
    let mut added = false;
    if !room.is_default() && !room.is_conversation() {
        let mut rooms = sender.rooms.lock().unwrap_or_else(|p| p.into_inner());
        if !rooms.contains(&room) && rooms.len() >= chat.limits.max_rooms {
            return Err(InputError::TooManyRooms(chat.limits.max_rooms));
        }
        added = rooms.insert(room.clone());
    }
    Ok(Joining {
        room,
        requested,
        added,
    })
}

/// The second half of `join`: the socket gets what it missed after `lastOffset` (or the newest
/// history), then live messages; acks `{ room, head }`. A store that cannot say the room's head
/// gets no ack (the client retries); an offset beyond the head is refused.
async fn finish_join<A: Adapter>(
    socket: SocketRef<A>,
    joining: Joining,
    ack: AckSender<A>,
    chat: &Chat,
    sender: &Sender,
) {
    #[derive(Serialize)]
    struct Joined<'a> {
        room: Option<&'a str>,
        head: i64,
    }
    let Joining {
        room,
        requested,
        added,
    } = joining;
    let undo = || {
        if added {
            sender
                .rooms
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&room);
        }
    };
    // An offset beyond what this node has released may still be behind the store's head:
    // only the store can refuse it.
    if let Some(after) = requested
        && chat.feed.head(&room).is_none_or(|head| after > head)
    {
        match chat.store.head(&room).await {
            Ok(head) if after > head => {
                undo();
                let error = InputError::BadOffset(format!(
                    "lastOffset {after} is ahead of the room's newest message ({head})"
                ));
                reject(ack, &error, &chat.metrics);
                return;
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(error = %error, %room, "room head unreadable; join not acked");
                undo();
                return;
            }
        }
    }
    let id: Arc<str> = socket.id.to_string().into();
    let history = chat.history;
    let after = |head| start_after(requested, head, history);
    match chat.feed.subscribe(&room, &id, after).await {
        Ok(Some(head)) => {
            // Presence first: once the join is acked, the room knows the socket is there.
            if added {
                chat.presence.enter(&socket, &room, &sender.name).await;
            }
            let joined = Joined {
                room: room.to_arg(),
                head,
            };
            if let Err(error) = ack.send(&(None::<()>, joined)) {
                tracing::debug!(socket = %socket.id, error = ?error, "join ack not sent");
            }
        }
        // The socket is gone.
        Ok(None) => undo(),
        Err(error) => {
            tracing::warn!(error = %error, %room, "room head unreadable; join not acked");
            undo();
        }
    }
}

/// `leave(room)`: the socket stops getting the room's messages; the room, and whether the
/// socket was in it (leaving a room one is not in is acked too). The default room and
/// conversations are not left.
fn on_leave<A: Adapter>(
    socket: &SocketRef<A>,
    args: &[Value],
    chat: &Chat,
    sender: &Sender,
) -> Result<(Room, bool), InputError> {
    let room = match Room::from_arg(args.first()) {
        Ok(room) if room.is_default() || room.is_conversation() => Err(InputError::CannotLeave),
        Ok(room) => Ok(room),
        Err(error) => Err(error.into()),
    }?;
    let was_in = sender
        .rooms
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&room);
    chat.feed.unsubscribe(&room, &socket.id.to_string());
    Ok((room, was_in))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_join_starts_after_its_offset_or_at_the_newest_history() {
        assert_eq!(start_after(Some(7), 100, History::Last(10)), 7);
        assert_eq!(start_after(None, 100, History::Last(10)), 90);
        assert_eq!(start_after(None, 4, History::Last(10)), 0);
        assert_eq!(start_after(None, 100, History::Unlimited), 0);
        assert_eq!(join_offset(None).unwrap(), None);
        assert_eq!(join_offset(Some(&json!(null))).unwrap(), None);
        assert_eq!(join_offset(Some(&json!(3))).unwrap(), Some(3));
        for bad in [json!(-1), json!(1.5), json!("3"), json!([])] {
            assert_eq!(
                join_offset(Some(&bad)).unwrap_err().code(),
                "invalid_offset"
            );
        }
    }
}
