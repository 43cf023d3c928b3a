//! Validation of the relative paths a peer sends.
//!
//! A received path is accepted only if writing it under the destination directory can neither
//! leave that directory nor surprise the user on any common filesystem: it must be relative,
//! `/`-separated, free of `.`/`..`/empty components, control characters and characters Windows
//! forbids, and no component may be a Windows device name or end in a dot or space. The checks
//! are lexical; the driver additionally refuses to follow any symbolic link already present under
//! the destination.
//!
//! Symbolic links are checked twice: each target on its own ([`validate_link_target`]), then all
//! of a share's links together ([`check_link_chains`]). A target is resolved lexically against
//! the tree the share lays out, and refused when it leaves the destination or when it passes
//! *through* another link of the share (`l1/../x` where `l1` is a link): a lexical `..` after a
//! link is not what the kernel does, which follows the link first. Such chains are refused
//! rather than followed; a link whose *last* component is another link of the share is allowed,
//! since that link's own target is checked the same way.

use std::collections::HashMap;
use std::fmt;

/// Longest component accepted, in bytes (the common `NAME_MAX`).
pub const MAX_COMPONENT_BYTES: usize = 255;
/// Deepest path accepted, in components.
pub const MAX_DEPTH: usize = 256;
/// Longest link target accepted, in bytes (Linux refuses longer ones: `PATH_MAX` - 1).
pub const MAX_LINK_TARGET_BYTES: usize = 4095;

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
    /// A symbolic link whose target passes through another link of the same share.
    #[error(
        "link target {target:?} passes through {via:?}, another link of the share (link chains \
         are refused)"
    )]
    LinkThroughLink {
        /// The target, as received.
        target: String,
        /// The link of the share it passes through.
        via: String,
    },
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
    if target.len() > MAX_LINK_TARGET_BYTES {
        return Err(PathError::TooLong);
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

/// Checks a share's links together, given as `(link path, target)` pairs that each passed
/// [`validate`] and [`validate_link_target`]: each target is resolved lexically against the tree
/// the share lays out, and refused if it leaves the destination or passes through another of
/// these links (see the module documentation). On refusal, returns the link's path and why.
///
/// Cost: linear in the bytes of the links' paths and targets.
pub fn check_link_chains<'a>(links: &[(&'a str, &'a str)]) -> Result<(), (&'a str, PathError)> {
    if links.is_empty() {
        return Ok(());
    }
    // A trie of the links' paths: node 0 is the destination; `link` marks a link's node.
    let mut children: HashMap<(usize, &str), usize> = HashMap::new();
    let mut link: Vec<Option<&str>> = vec![None];
    for (path, _) in links {
        let mut node = 0;
        for part in path.split('/') {
            let next = link.len();
            node = *children.entry((node, part)).or_insert(next);
            if node == next {
                link.push(None);
            }
        }
        link[node] = Some(path);
    }
    for &(path, target) in links {
        let refuse = |source| Err((path, source));
        // Where resolution stands: one item per level below the destination, holding the trie
        // node when the level is part of some link's path (`None`: no link lies below).
        let mut stack: Vec<Option<usize>> = Vec::new();
        let mut parts: Vec<&str> = path.split('/').collect();
        parts.pop();
        for part in parts {
            let up = stack.last().copied().unwrap_or(Some(0));
            stack.push(up.and_then(|n| children.get(&(n, part)).copied()));
        }
        // The link just stepped onto, if any: anything but the end after it is refused.
        let mut on_link: Option<&str> = None;
        for part in target.split('/') {
            if matches!(part, "" | ".") {
                continue;
            }
            if let Some(via) = on_link {
                return refuse(PathError::LinkThroughLink {
                    target: target.to_owned(),
                    via: via.to_owned(),
                });
            }
            if part == ".." {
                if stack.pop().is_none() {
                    return refuse(PathError::LinkEscapes(target.to_owned()));
                }
                continue;
            }
            let up = stack.last().copied().unwrap_or(Some(0));
            let node = up.and_then(|n| children.get(&(n, part)).copied());
            on_link = node.and_then(|n| link.get(n).copied().flatten());
            stack.push(node);
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
    fn link_chains_are_refused_by_name() {
        let deep = "a1/a2/a3/a4/a5/a6/a7/a8/a9/a10";
        let l1 = format!("{deep}/l1");
        let up10 = [".."; 10].join("/");
        let through = format!("{l1}/{}/etc/passwd", [".."; 11].join("/"));
        // Each target alone stays inside lexically...
        assert!(validate_link_target(&l1, &up10).is_ok());
        assert!(validate_link_target("notes.txt", &through).is_ok());
        // ...but together the second passes through the first.
        let err = check_link_chains(&[(&l1, &up10), ("notes.txt", &through)]).unwrap_err();
        assert_eq!(
            err,
            (
                "notes.txt",
                PathError::LinkThroughLink {
                    target: through.clone(),
                    via: l1.clone()
                }
            )
        );
        // Order does not matter.
        assert!(check_link_chains(&[("notes.txt", &through), (&l1, &up10)]).is_err());
        // `..` right after a link is the same trap.
        assert!(check_link_chains(&[("d/l", "../x"), ("m", "d/l/..")]).is_err());
        // Paths that only share a prefix with a link, and links ending at a link, are fine.
        assert!(check_link_chains(&[("d/l", "../x"), ("m", "d/lx/../y"), ("n", "d/l")]).is_ok());
        assert!(check_link_chains(&[("a/b/l", "../../c"), ("x", "./a/./b/../b/l")]).is_ok());
        assert_eq!(
            check_link_chains(&[("a/l", "../../x")]),
            Err(("a/l", PathError::LinkEscapes("../../x".into())))
        );
        assert_eq!(
            validate_link_target("l", &"a/".repeat(3000)),
            Err(PathError::TooLong)
        );
    }

    #[test]
    fn escaped_hides_terminal_sequences() {
        assert_eq!(Escaped("a\u{1b}[2Jb").to_string(), "a\\u{1b}[2Jb");
    }
}
