//! Display names: what a person may be called in the chat (SPEC, "Names").

/// The longest name, in characters, after trimming.
pub const MAX_NAME_CHARS: usize = 32;

/// Why a name cannot be used; the message says what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Empty after trimming, or longer than the limit.
    #[error("a name must be 1 to {MAX_NAME_CHARS} characters")]
    Length,
    /// A control character, or `|` (which joins the names of a conversation).
    #[error("a name must not contain control characters or |")]
    Character,
    /// `@` starts the names of conversations.
    #[error("a name must not start with @")]
    At,
}

/// The name `raw` stands for: trimmed, and checked against the rules.
pub fn display_name(raw: &str) -> Result<String, NameError> {
    let name = raw.trim();
    if name.is_empty() || name.chars().count() > MAX_NAME_CHARS {
        return Err(NameError::Length);
    }
    if name.chars().any(|c| c.is_control() || c == '|') {
        return Err(NameError::Character);
    }
    if name.starts_with('@') {
        return Err(NameError::At);
    }
    Ok(name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_rules() {
        assert_eq!(display_name("  Ada ").as_deref(), Ok("Ada"));
        assert_eq!(
            display_name(&"é".repeat(32)).map(|n| n.chars().count()),
            Ok(32)
        );
        assert_eq!(display_name(""), Err(NameError::Length));
        assert_eq!(display_name("   "), Err(NameError::Length));
        assert_eq!(display_name(&"x".repeat(33)), Err(NameError::Length));
        assert_eq!(display_name("a|b"), Err(NameError::Character));
        assert_eq!(display_name("a\u{7}b"), Err(NameError::Character));
        assert_eq!(display_name("@ada"), Err(NameError::At));
    }
}
