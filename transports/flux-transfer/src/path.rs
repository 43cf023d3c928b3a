//! Validation of the relative paths a peer sends.
//!
//! A received path is accepted only if writing it under the destination directory can neither
//! leave that directory nor surprise the user on any common filesystem: it must be relative,
//! `/`-separated, free of `.`/`..`/empty components, control characters and characters Windows
//! forbids, and no component may be a Windows device name or end in a dot or space. The checks
//! are lexical; the driver additionally refuses to follow any symbolic link already present under
//! the destination.

use std::fmt;

/// Longest component accepted, in bytes (the common `NAME_MAX`).
pub const MAX_COMPONENT_BYTES: usize = 255;
/// Deepest path accepted, in components.
pub const MAX_DEPTH: usize = 256;

/// Why a path was refused.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    /// The path is empty.
    #[error("empty path")]
    Empty,
    /// The path is absolute.
    #[error("absolute path")]
    Absolute,
    /// A `.` or `..` component, or an empty one (`a//b`, trailing `/`).
    #[error("path component {0:?} is not allowed")]
    BadComponent(String),
    /// A control character, NUL or escape.
    #[error("control character {0:?} in path")]
    ControlChar(char),
    /// A character that is a separator or reserved on some system (`\ : * ? " < > |`).
    #[error("reserved character {0:?} in path")]
    ReservedChar(char),
    /// A Windows device name such as `CON` or `LPT1.txt`.
    #[error("reserved device name {0:?}")]
    ReservedName(String),
    /// A component ending in `.` or a space, which Windows silently strips.
    #[error("component {0:?} ends in a dot or space")]
    TrailingDotOrSpace(String),
    /// A component longer than [`MAX_COMPONENT_BYTES`] or a path deeper than [`MAX_DEPTH`].
    #[error("path too long")]
    TooLong,
    /// A symbolic link whose target is absolute or leaves the destination.
    #[error("link target {0:?} leads outside the destination")]
    LinkEscapes(String),
}

/// Checks a received relative path and returns its components.
pub fn validate(path: &str) -> Result<Vec<&str>, PathError> {
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    if path.starts_with('/') {
        return Err(PathError::Absolute);
    }
    let parts: Vec<&str> = path.split('/').collect();
    if parts.len() > MAX_DEPTH {
        return Err(PathError::TooLong);
    }
    for part in &parts {
        validate_component(part)?;
    }
    Ok(parts)
}

/// Checks a symbolic link target relative to the link at `link_path` (already validated): the
/// target must be relative and, resolved lexically, stay inside the destination.
pub fn validate_link_target(link_path: &str, target: &str) -> Result<(), PathError> {
    let escapes = || PathError::LinkEscapes(target.to_owned());
    if target.is_empty() {
        return Err(PathError::Empty);
    }
    if target.starts_with('/') {
        return Err(escapes());
    }
    // Depth of the directory holding the link.
    let mut depth: usize = link_path.split('/').count().saturating_sub(1);
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => depth = depth.checked_sub(1).ok_or_else(escapes)?,
            p => {
                validate_component(p)?;
                depth += 1;
            }
        }
    }
    Ok(())
}

fn validate_component(part: &str) -> Result<(), PathError> {
    if part.is_empty() || part == "." || part == ".." {
        return Err(PathError::BadComponent(part.to_owned()));
    }
    if part.len() > MAX_COMPONENT_BYTES {
        return Err(PathError::TooLong);
    }
    for c in part.chars() {
        if c.is_control() {
            return Err(PathError::ControlChar(c));
        }
        if matches!(c, '\\' | ':' | '*' | '?' | '"' | '<' | '>' | '|') {
            return Err(PathError::ReservedChar(c));
        }
    }
    if part.ends_with('.') || part.ends_with(' ') {
        return Err(PathError::TrailingDotOrSpace(part.to_owned()));
    }
    let stem = part.split('.').next().unwrap_or(part).trim_end();
    if is_windows_device(stem) {
        return Err(PathError::ReservedName(part.to_owned()));
    }
    Ok(())
}

fn is_windows_device(stem: &str) -> bool {
    let upper = stem.to_ascii_uppercase();
    match upper.as_str() {
        "CON" | "PRN" | "AUX" | "NUL" | "CONIN$" | "CONOUT$" => true,
        s if s.len() == 4 && (s.starts_with("COM") || s.starts_with("LPT")) => {
            // COM1..COM9, LPT1..LPT9 and the superscript digits Windows also reserves.
            matches!(s.as_bytes()[3], b'1'..=b'9')
        }
        _ => {
            (upper.starts_with("COM") || upper.starts_with("LPT"))
                && matches!(&upper[3..], "¹" | "²" | "³")
        }
    }
}

/// Displays untrusted text with control and escape characters made visible, for terminals.
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_paths_pass() {
        for p in [
            "a",
            "a/b/c.txt",
            "photos/2024 trip/img 1.jpg",
            "ünï/çødé",
            ".hidden",
        ] {
            assert!(validate(p).is_ok(), "{p}");
        }
    }

    #[test]
    fn bad_input_catalogue_is_refused_with_a_reason() {
        let cases: &[(&str, PathError)] = &[
            ("../x", PathError::BadComponent("..".into())),
            ("/etc/x", PathError::Absolute),
            ("a/../../x", PathError::BadComponent("..".into())),
            ("C:\\x", PathError::ReservedChar(':')),
            ("a\\b", PathError::ReservedChar('\\')),
            ("CON", PathError::ReservedName("CON".into())),
            ("dir/lpt1.txt", PathError::ReservedName("lpt1.txt".into())),
            ("x.", PathError::TrailingDotOrSpace("x.".into())),
            ("x ", PathError::TrailingDotOrSpace("x ".into())),
            ("a\u{1b}[31m", PathError::ControlChar('\u{1b}')),
            ("a\0b", PathError::ControlChar('\0')),
            ("", PathError::Empty),
            (".", PathError::BadComponent(".".into())),
            ("a//b", PathError::BadComponent(String::new())),
            ("a/", PathError::BadComponent(String::new())),
        ];
        for (p, want) in cases {
            assert_eq!(validate(p).err().as_ref(), Some(want), "{p:?}");
        }
        assert_eq!(validate(&"n".repeat(10_000_000)), Err(PathError::TooLong));
        assert_eq!(
            validate(&"a/".repeat(300).add_tail()),
            Err(PathError::TooLong)
        );
    }

    trait AddTail {
        fn add_tail(self) -> String;
    }
    impl AddTail for String {
        fn add_tail(mut self) -> String {
            self.push('z');
            self
        }
    }

    #[test]
    fn link_targets_stay_inside() {
        assert!(validate_link_target("a/b/link", "../c").is_ok());
        assert!(validate_link_target("a/link", "../c").is_ok());
        assert!(validate_link_target("a/link", "./x/../y").is_ok());
        assert_eq!(
            validate_link_target("link", "../etc/passwd"),
            Err(PathError::LinkEscapes("../etc/passwd".into()))
        );
        assert_eq!(
            validate_link_target("a/link", "/etc/passwd"),
            Err(PathError::LinkEscapes("/etc/passwd".into()))
        );
        assert_eq!(
            validate_link_target("a/link", "../../x"),
            Err(PathError::LinkEscapes("../../x".into()))
        );
    }

    #[test]
    fn escaped_hides_terminal_sequences() {
        assert_eq!(Escaped("a\u{1b}[2Jb").to_string(), "a\\u{1b}[2Jb");
    }
}
