//! The routing id: the public half of a join code, assigned by the server.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The session name the server assigns on create: [`RoutingId::LEN`] Crockford base32
/// characters (30 bits).
///
/// It is the public half of a join code; the secret half never reaches the server. 30 bits
/// against at most a few thousand live sessions, per-IP limits on joins to unknown ids and a
/// per-session cap on failed joins make blind guessing useless (see `PROTOCOL.md`).
///
/// Parsing is case-insensitive and accepts the Crockford confusables (`O`→`0`, `I`/`L`→`1`);
/// [`Display`](fmt::Display) gives the canonical upper-case form.
#[derive(Clone, Copy, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub struct RoutingId([u8; RoutingId::LEN]);

impl RoutingId {
    /// Number of characters in a routing id.
    pub const LEN: usize = 6;

    /// Builds an id from caller-supplied random bits (the low 30 are used).
    ///
    /// The caller must pass output of a cryptographically secure generator: the id's
    /// unguessability is the only thing between a scanner and a live session.
    pub fn from_entropy(bits: u64) -> Self {
        let mut out = [0u8; Self::LEN];
        for (i, c) in out.iter_mut().enumerate() {
            let idx = (bits >> (5 * (Self::LEN - 1 - i))) & 0x1f;
            *c = ALPHABET[idx as usize];
        }
        Self(out)
    }

    /// The canonical text form.
    pub fn as_str(&self) -> &str {
        // Invariant: every byte comes from ALPHABET, which is ASCII.
        std::str::from_utf8(&self.0).unwrap_or("")
    }
}

impl FromStr for RoutingId {
    type Err = ParseRoutingIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = s.as_bytes();
        if bytes.len() != Self::LEN {
            return Err(ParseRoutingIdError::Length);
        }
        let mut out = [0u8; Self::LEN];
        for (o, &b) in out.iter_mut().zip(bytes) {
            *o = canonical(b).ok_or(ParseRoutingIdError::Character)?;
        }
        Ok(Self(out))
    }
}

impl fmt::Display for RoutingId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for RoutingId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RoutingId({})", self.as_str())
    }
}

impl Serialize for RoutingId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for RoutingId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Why a string is not a routing id.
#[derive(Clone, Copy, Debug, Eq, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseRoutingIdError {
    /// Not exactly [`RoutingId::LEN`] characters.
    #[error("a routing id has exactly 6 characters")]
    Length,
    /// A character outside the Crockford base32 alphabet.
    #[error("a routing id uses only Crockford base32 characters")]
    Character,
}

/// Crockford base32: digits and upper-case letters without I, L, O, U.
const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

fn canonical(b: u8) -> Option<u8> {
    let up = b.to_ascii_uppercase();
    match up {
        b'O' => Some(b'0'),
        b'I' | b'L' => Some(b'1'),
        _ if ALPHABET.contains(&up) => Some(up),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn confusables_and_case_map_to_canonical() {
        let id: RoutingId = "k7qfol".parse().unwrap();
        assert_eq!(id.to_string(), "K7QF01");
        assert_eq!(
            "K7QF0".parse::<RoutingId>(),
            Err(ParseRoutingIdError::Length)
        );
        assert_eq!(
            "K7QF0U".parse::<RoutingId>(),
            Err(ParseRoutingIdError::Character)
        );
        assert_eq!(
            "K7QF0é".parse::<RoutingId>(),
            Err(ParseRoutingIdError::Length)
        );
    }

    proptest! {
        #[test]
        fn display_parse_round_trip(bits in any::<u64>()) {
            let id = RoutingId::from_entropy(bits);
            prop_assert_eq!(id.to_string().parse::<RoutingId>(), Ok(id));
            let json = serde_json::to_string(&id).unwrap();
            prop_assert_eq!(serde_json::from_str::<RoutingId>(&json).unwrap(), id);
        }

        #[test]
        fn distinct_30_bit_values_give_distinct_ids(a in 0u64..(1 << 30), b in 0u64..(1 << 30)) {
            prop_assume!(a != b);
            prop_assert_ne!(RoutingId::from_entropy(a), RoutingId::from_entropy(b));
        }

        #[test]
        fn parse_never_panics(s in ".{0,12}") {
            let _ = s.parse::<RoutingId>();
        }
    }
}
