//! Rooms: what a room may be called, the default room, and conversations (the two-person rooms
//! of private messages), by SPEC's "Rooms and people".
//!
//! Each room has its own gapless offsets and its own total order; a [`Room`] is the key that
//! every layer (store, writer, feed, bus, recovery log) carries beside a message's offset.

use std::{fmt, sync::Arc};

use serde_json::Value;

use crate::names::{NameError, display_name};

/// The longest room name, in characters.
pub const MAX_ROOM_CHARS: usize = 64;

/// A room's key. The default room (the tutorial's chat) is the empty string, which no room
/// name can be; a conversation is `@` + its two people's names, sorted by code point, joined
/// by `|`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Room(Arc<str>);

/// Why a room name cannot be used; the message says what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoomError {
    /// Neither a string nor `null`.
    #[error("a room must be a string, or null for the default room")]
    NotString,
    /// Empty, or longer than the limit.
    #[error("a room name must be 1 to {MAX_ROOM_CHARS} characters")]
    Length,
    /// A control character.
    #[error("a room name must not contain control characters")]
    Character,
    /// Starts with `@` but is not two valid names joined by `|` in order.
    #[error("{0} is not a conversation (@ and two names sorted, joined by |)")]
    NotAConversation(String),
}

impl Room {
    /// The default room: the tutorial's chat, `null` wherever an event names a room.
    pub fn default_room() -> Self {
        Self(Arc::from(""))
    }

    /// The room a key names, as stored (no checks: for keys read back from the store or Redis).
    pub fn from_key(key: &str) -> Self {
        Self(Arc::from(key))
    }

    /// The room an event argument names: `null` for the default room, or a valid room name.
    /// A name starting with `@` must be a well-formed conversation; who may use it is the
    /// caller's question.
    pub fn from_arg(arg: Option<&Value>) -> Result<Self, RoomError> {
        match arg {
            None | Some(Value::Null) => Ok(Self::default_room()),
            Some(Value::String(name)) => Self::named(name),
            Some(_) => Err(RoomError::NotString),
        }
    }

    /// A named room (not the default one), checked.
    pub fn named(name: &str) -> Result<Self, RoomError> {
        let chars = name.chars().count();
        if chars == 0 || chars > MAX_ROOM_CHARS {
            return Err(RoomError::Length);
        }
        if name.chars().any(char::is_control) {
            return Err(RoomError::Character);
        }
        let room = Self(Arc::from(name));
        if name.starts_with('@') && room.people().is_none() {
            return Err(RoomError::NotAConversation(name.to_owned()));
        }
        Ok(room)
    }

    /// The conversation of two people (in either order).
    pub fn conversation(a: &str, b: &str) -> Self {
        let (first, second) = if a <= b { (a, b) } else { (b, a) };
        Self(Arc::from(format!("@{first}|{second}")))
    }

    /// The key the store and Redis know the room by.
    pub fn key(&self) -> &str {
        &self.0
    }

    /// Whether this is the default room.
    pub fn is_default(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether this is a conversation.
    pub fn is_conversation(&self) -> bool {
        self.0.starts_with('@')
    }

    /// A conversation's two people, in order; `None` for any other room (or a malformed one).
    pub fn people(&self) -> Option<(&str, &str)> {
        let (a, b) = self.0.strip_prefix('@')?.split_once('|')?;
        let valid = |n: &str| display_name(n).is_ok_and(|d| d == n);
        (valid(a) && valid(b) && a < b).then_some((a, b))
    }

    /// Whether `person` is one of this conversation's people (false for every other room).
    pub fn has_person(&self, person: &str) -> bool {
        self.people()
            .is_some_and(|(a, b)| a == person || b == person)
    }

    /// The room as an event names it: `null` for the default room, else its name.
    pub fn to_arg(&self) -> Option<&str> {
        (!self.is_default()).then_some(&*self.0)
    }
}

impl fmt::Debug for Room {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_default() {
            f.write_str("(default room)")
        } else {
            write!(f, "{:?}", &*self.0)
        }
    }
}

impl fmt::Display for Room {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The recipient of a private message: a name, checked like any name.
pub fn recipient(arg: Option<&Value>) -> Result<String, NameError> {
    match arg {
        Some(Value::String(raw)) => display_name(raw),
        _ => Err(NameError::Length),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn room_names_follow_the_rules() {
        assert!(Room::from_arg(None).unwrap().is_default());
        assert!(Room::from_arg(Some(&json!(null))).unwrap().is_default());
        assert_eq!(
            Room::from_arg(Some(&json!("lobby"))).unwrap().key(),
            "lobby"
        );
        assert_eq!(
            Room::from_arg(Some(&json!(5))).unwrap_err(),
            RoomError::NotString
        );
        assert_eq!(Room::named("").unwrap_err(), RoomError::Length);
        assert_eq!(Room::named(&"r".repeat(65)).unwrap_err(), RoomError::Length);
        assert!(Room::named(&"é".repeat(64)).is_ok());
        assert_eq!(Room::named("a\nb").unwrap_err(), RoomError::Character);
        assert!(matches!(
            Room::named("@ada").unwrap_err(),
            RoomError::NotAConversation(_)
        ));
        // Out of order, or one name invalid.
        assert!(Room::named("@bob|ada").is_err());
        assert!(Room::named("@ada| bob").is_err());
        assert!(Room::named("@ada|bob").is_ok());
    }

    #[test]
    fn a_conversation_is_its_two_names_sorted_by_code_point() {
        let room = Room::conversation("zoë", "Ada");
        assert_eq!(room.key(), "@Ada|zoë");
        assert_eq!(room, Room::conversation("Ada", "zoë"));
        assert_eq!(room.people(), Some(("Ada", "zoë")));
        assert!(room.has_person("zoë") && !room.has_person("zo"));
        assert!(room.is_conversation() && !room.is_default());
        assert!(!Room::named("lobby").unwrap().has_person("lobby"));
        assert_eq!(Room::default_room().to_arg(), None);
        assert_eq!(room.to_arg(), Some("@Ada|zoë"));
    }
}
