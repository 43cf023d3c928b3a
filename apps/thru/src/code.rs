//! The join code: what the host prints and the joiner types.
//!
//! A code has two parts, written `RRRRRR-SSSS-SSSS` (for example `K7QF2M-XD4P-RT9A`):
//!
//! - **Routing part** (`RRRRRR`, 6 Crockford base32 characters, 30 bits): the
//!   `thruserv` session id ([`RoutingId`]). The server assigns it on `create_session` and
//!   sees it on every `join_session`. In LAN mode (no server) the host draws it itself and
//!   the joiner finds the host's mDNS advertisement by a hash of it.
//! - **Secret part** (`SSSS-SSSS`, 8 Crockford base32 characters, 40 bits): drawn by the
//!   host from the OS CSPRNG, never sent anywhere. Host and joiner run a PAKE over it
//!   ([`crate::pake`]), so an attacker gets one online guess per attempt (a 1 in 2^40
//!   chance) and the host ends the session after a failed attempt.
//!
//! **Word form** (`thru host --words`): the same code with the secret written as five words
//! from a list of 256 (8 bits each, so the same 40 bits), for reading aloud:
//! `K7QF2M-delta-maple-river-tiger-wolf`. Every word is known by its first three letters,
//! which are enough to type it. Both forms name the same secret (the PAKE runs over the
//! canonical characters), so a host may print either and the joiner may type either. Why not
//! the default: the Crockford form is 14 characters to type against about 21 (three letters a
//! word) to 35 for the words; the words win only when the code is spoken.
//!
//! Parsing is forgiving about what people do when copying codes: case does not matter,
//! spaces and dashes anywhere are ignored, and the Crockford confusables map to their digits
//! (`O`→`0`, `I`/`L`→`1`). Errors say which part is wrong and why.
//!
//! What this module does not do: carry addresses. In LAN mode the joiner finds the host by
//! mDNS, or the user passes `--peer ADDR` (the host prints it); see [`crate::rendezvous`].

use std::fmt;
use std::str::FromStr;

use flux_signal_proto::RoutingId;

/// A parsed join code.
#[derive(Clone, Eq, PartialEq)]
pub struct JoinCode {
    routing: RoutingId,
    secret: Secret,
}

/// The secret part of a join code: [`Secret::LEN`] canonical Crockford base32 characters.
#[derive(Clone, Copy, Eq, PartialEq)]
pub struct Secret([u8; Secret::LEN]);

impl Secret {
    /// Number of characters (5 bits each: 40 bits).
    pub const LEN: usize = 8;

    /// A secret from caller-supplied random bits (the low 40 are used). The caller must pass
    /// output of a cryptographically secure generator.
    pub fn from_entropy(bits: u64) -> Self {
        let mut out = [0u8; Self::LEN];
        for (i, c) in out.iter_mut().enumerate() {
            let idx = (bits >> (5 * (Self::LEN - 1 - i))) & 0x1f;
            *c = ALPHABET[idx as usize];
        }
        Self(out)
    }

    /// A fresh secret from the OS CSPRNG.
    pub fn generate() -> Result<Self, getrandom::Error> {
        Ok(Self::from_entropy(random_u64()?))
    }

    /// The canonical characters, as the PAKE password.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The 40 bits the characters encode.
    fn bits(&self) -> u64 {
        self.0.iter().fold(0u64, |acc, c| {
            let idx = ALPHABET.iter().position(|a| a == c).unwrap_or(0) as u64;
            (acc << 5) | idx
        })
    }

    /// The five words of the word form.
    pub fn words(&self) -> [&'static str; WORD_COUNT] {
        let bits = self.bits();
        std::array::from_fn(|i| WORDS[((bits >> (8 * (WORD_COUNT - 1 - i))) & 0xff) as usize])
    }
}

/// Words in the word form of a secret.
pub const WORD_COUNT: usize = 5;

/// The words of the word form, in order: word `i` stands for the byte `i`. Every one has its
/// own first three letters (a test checks it), so three letters are enough to type it.
pub const WORDS: [&str; 256] = [
    "able", "acorn", "adult", "agent", "alarm", "alpha", "anchor", "ankle", "arena", "arrow",
    "aspen", "audio", "awake", "azure", "bagel", "bamboo", "barn", "beach", "bench", "bevel",
    "birch", "bless", "blue", "bonus", "book", "bottle", "bowl", "bread", "brush", "bucket",
    "built", "bunny", "bush", "cabin", "cake", "camel", "caramel", "cedar", "cement", "chime",
    "cinema", "civic", "clever", "coach", "coffee", "comet", "cosmic", "cove", "crisp", "cube",
    "cupcake", "cushion", "dance", "decoy", "delta", "desk", "digit", "dinner", "diver", "domino",
    "dove", "dozen", "drift", "duet", "dust", "easel", "edge", "effort", "elder", "emerald",
    "ending", "entry", "envoy", "equal", "evening", "expert", "fabric", "fancy", "feather",
    "fiber", "field", "finch", "fish", "flute", "folk", "fox", "fresh", "fudge", "gadget", "game",
    "gentle", "giraffe", "globe", "golden", "gospel", "green", "guava", "gust", "habit", "hatch",
    "heart", "hickory", "hiking", "hobby", "honey", "hope", "hover", "hunter", "hymn", "idea",
    "impact", "infant", "iris", "ivory", "jaguar", "jazz", "jewel", "jingle", "journey", "juggle",
    "jungle", "kayak", "kernel", "kidney", "kiosk", "knife", "label", "lagoon", "lantern", "laser",
    "lava", "leaf", "lettuce", "library", "linen", "lizard", "locket", "lotus", "lunar", "maize",
    "maple", "meadow", "memory", "mercy", "mighty", "mineral", "mitten", "model", "mosaic",
    "mouse", "museum", "narrow", "navy", "needle", "nest", "nickel", "noble", "novel", "nurse",
    "nylon", "oatmeal", "octave", "offer", "onion", "opera", "orbit", "origin", "outdoor", "oven",
    "oyster", "palace", "paper", "patch", "pelican", "pepper", "phone", "pigeon", "pine", "pizza",
    "pocket", "pond", "portal", "prairie", "pyramid", "queen", "rabbit", "raft", "rally", "razor",
    "reef", "remote", "rice", "river", "robin", "romance", "rotor", "ruby", "ruler", "rustic",
    "salad", "satin", "scarf", "scooter", "secret", "sequel", "shelf", "shovel", "silver",
    "sister", "skiff", "smile", "soccer", "solar", "soup", "spoon", "stable", "summit", "surf",
    "swift", "syrup", "tadpole", "target", "tavern", "terrace", "tiger", "tiny", "tomato",
    "tornado", "tower", "tunnel", "twig", "uncle", "urban", "vacuum", "vanilla", "venus",
    "victory", "vintage", "virtue", "vivid", "voyage", "wafer", "wander", "wave", "wedge",
    "whisper", "window", "wolf", "wooden", "wrist", "yak", "yeti", "yoyo", "zenith", "zigzag",
    "zodiac",
];

/// The byte a typed word stands for: a whole word, or a prefix of one of at least three
/// letters, in any case.
fn word_value(typed: &str) -> Option<u8> {
    let t = typed.to_ascii_lowercase();
    if t.len() < 3 {
        return None;
    }
    let i = WORDS.iter().position(|w| w.starts_with(&t))?;
    u8::try_from(i).ok()
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret by accident (logs, panics).
        f.write_str("Secret(..)")
    }
}

impl JoinCode {
    /// Characters in the canonical form without separators.
    pub const CHARS: usize = RoutingId::LEN + Secret::LEN;

    /// A code from its parts.
    pub fn new(routing: RoutingId, secret: Secret) -> Self {
        Self { routing, secret }
    }

    /// A code for a server-assigned routing id with a fresh secret.
    pub fn with_fresh_secret(routing: RoutingId) -> Result<Self, getrandom::Error> {
        Ok(Self::new(routing, Secret::generate()?))
    }

    /// A code with a locally drawn routing id (LAN mode) and a fresh secret.
    pub fn generate_local() -> Result<Self, getrandom::Error> {
        Ok(Self::new(
            RoutingId::from_entropy(random_u64()?),
            Secret::generate()?,
        ))
    }

    /// The part the server sees.
    pub fn routing(&self) -> RoutingId {
        self.routing
    }

    /// The part nobody but the two peers ever sees.
    pub fn secret(&self) -> &Secret {
        &self.secret
    }
}

impl JoinCode {
    /// The word form, `RRRRRR-word-word-word-word-word`. Only for showing to the user.
    pub fn to_words(&self) -> String {
        format!("{}-{}", self.routing, self.secret.words().join("-"))
    }

    /// Parses the word form; `None` when `s` does not look like one (then it is read as the
    /// character form).
    fn parse_words(s: &str) -> Option<Result<Self, CodeError>> {
        let tokens: Vec<&str> = s
            .split(|c: char| c == '-' || c.is_whitespace())
            .filter(|t| !t.is_empty())
            .collect();
        let (routing, words) = tokens.split_first()?;
        if words.len() != WORD_COUNT
            || !words
                .iter()
                .all(|w| w.chars().all(|c| c.is_ascii_alphabetic()))
        {
            return None;
        }
        let routing: RoutingId = match Self::from_str(&format!("{routing}00000000")) {
            Ok(c) => c.routing,
            Err(e) => return Some(Err(e)),
        };
        let mut bits = 0u64;
        for (i, w) in words.iter().enumerate() {
            match word_value(w) {
                Some(v) => bits = (bits << 8) | u64::from(v),
                None => {
                    return Some(Err(CodeError::Word {
                        word: (*w).to_string(),
                        position: i + 1,
                    }));
                }
            }
        }
        Some(Ok(Self::new(routing, Secret::from_entropy(bits))))
    }
}

/// The full code in its display form, `RRRRRR-SSSS-SSSS`. Only for showing to the user.
impl fmt::Display for JoinCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.secret.0;
        // Invariant: every byte is from ALPHABET (ASCII).
        let half = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        write!(f, "{}-{}-{}", self.routing, half(&s[..4]), half(&s[4..]))
    }
}

impl fmt::Debug for JoinCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JoinCode({}-…)", self.routing)
    }
}

impl FromStr for JoinCode {
    type Err = CodeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(parsed) = Self::parse_words(s) {
            return parsed;
        }
        let mut chars = Vec::with_capacity(Self::CHARS);
        let mut found = 0usize;
        for c in s.chars() {
            if c == '-' || c.is_whitespace() {
                continue;
            }
            found += 1;
            let part = if found <= RoutingId::LEN {
                Part::Routing
            } else {
                Part::Secret
            };
            match canonical(c) {
                Some(b) => chars.push(b),
                None => {
                    return Err(CodeError::Character {
                        ch: c,
                        position: found,
                        part,
                    });
                }
            }
        }
        if found == 0 {
            return Err(CodeError::Empty);
        }
        if found != Self::CHARS {
            return Err(CodeError::Length { found });
        }
        let (r, sec) = chars.split_at(RoutingId::LEN);
        // Invariant: `r` holds 6 canonical ASCII characters, which RoutingId accepts.
        let routing = std::str::from_utf8(r)
            .ok()
            .and_then(|r| r.parse().ok())
            .ok_or(CodeError::Length { found })?;
        let mut secret = [0u8; Secret::LEN];
        secret.copy_from_slice(sec);
        Ok(Self::new(routing, Secret(secret)))
    }
}

/// Which part of a code an error is about.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Part {
    /// The first 6 characters.
    Routing,
    /// The last 8 characters.
    Secret,
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Routing => "session part (first 6 characters)",
            Self::Secret => "secret part (last 8 characters)",
        })
    }
}

/// Why a string is not a join code.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CodeError {
    /// Nothing but separators.
    #[error("the join code is empty (it looks like K7QF2M-XD4P-RT9A)")]
    Empty,
    /// Not 14 characters once dashes and spaces are removed.
    #[error("a join code has 14 characters (6 + 8, like K7QF2M-XD4P-RT9A); this one has {found}")]
    Length {
        /// Characters found, separators not counted.
        found: usize,
    },
    /// A word of the word form that is not on the list.
    #[error(
        "word {position} of the secret, {word:?}, is not one of thru's code words (three letters \
         of a word are enough; check the spelling)"
    )]
    Word {
        /// As typed.
        word: String,
        /// 1-based.
        position: usize,
    },
    /// A character outside Crockford base32.
    #[error(
        "character {ch:?} at position {position} in the {part} is not allowed: join codes use \
         digits and the letters A-Z except U"
    )]
    Character {
        /// The character.
        ch: char,
        /// 1-based, separators not counted.
        position: usize,
        /// The part it is in.
        part: Part,
    },
}

/// Crockford base32: digits and upper-case letters without I, L, O, U.
const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

fn canonical(c: char) -> Option<u8> {
    if !c.is_ascii() {
        return None;
    }
    let up = (c as u8).to_ascii_uppercase();
    match up {
        b'O' => Some(b'0'),
        b'I' | b'L' => Some(b'1'),
        _ if ALPHABET.contains(&up) => Some(up),
        _ => None,
    }
}

fn random_u64() -> Result<u64, getrandom::Error> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

#[cfg(test)]
mod tests {
    /// The word form names the same secret as the characters, both ways, with three letters
    /// a word enough; every word has its own three letters.
    #[test]
    fn word_form_round_trips_and_takes_prefixes() {
        let mut prefixes: Vec<&str> = WORDS.iter().map(|w| &w[..3]).collect();
        prefixes.sort_unstable();
        prefixes.dedup();
        assert_eq!(prefixes.len(), 256, "three letters must name one word");
        for bits in [0u64, 1, 0xff_ffff_ffff, 0x12_3456_789a, 0xa5_5a_a5_5a_a5] {
            let code = JoinCode::new("K7QF2M".parse().unwrap(), Secret::from_entropy(bits));
            let words = code.to_words();
            assert_eq!(words.split('-').count(), 1 + WORD_COUNT, "{words}");
            let back: JoinCode = words.parse().unwrap();
            assert_eq!(back, code, "{words}");
            let typed: String = words
                .split('-')
                .enumerate()
                .map(|(i, w)| {
                    if i == 0 {
                        w.to_string()
                    } else {
                        w[..3].to_uppercase()
                    }
                })
                .collect::<Vec<_>>()
                .join(" ");
            assert_eq!(typed.parse::<JoinCode>().unwrap(), code, "{typed}");
            // The character form of the same code still parses to it.
            assert_eq!(code.to_string().parse::<JoinCode>().unwrap(), code);
        }
        let err = "K7QF2M-able-able-able-zzz-able"
            .parse::<JoinCode>()
            .unwrap_err();
        assert!(
            matches!(err, CodeError::Word { position: 4, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("\"zzz\""), "{err}");
    }

    use super::*;

    #[test]
    fn display_parse_round_trip_and_shape() {
        for _ in 0..200 {
            let code = JoinCode::generate_local().unwrap();
            let text = code.to_string();
            assert_eq!(text.len(), 16, "{text}");
            assert_eq!(&text[6..7], "-");
            assert_eq!(&text[11..12], "-");
            assert_eq!(text.parse::<JoinCode>().unwrap(), code);
        }
    }

    #[test]
    fn parsing_forgives_case_spaces_dashes_and_confusables() {
        let want: JoinCode = "K7QF2M-XD4P-RT9A".parse().unwrap();
        for s in [
            "k7qf2m-xd4p-rt9a",
            "K7QF2MXD4PRT9A",
            "  K7QF 2M XD4P RT9A\n",
            "K7QF2M-XD4PRT9A",
        ] {
            assert_eq!(s.parse::<JoinCode>().unwrap(), want, "{s}");
        }
        let a: JoinCode = "K7QFOL-XD4P-RTIA".parse().unwrap();
        let b: JoinCode = "K7QF01-XD4P-RT1A".parse().unwrap();
        assert_eq!(a, b);
        assert_eq!(a.routing().to_string(), "K7QF01");
    }

    #[test]
    fn errors_name_what_is_wrong() {
        assert_eq!("".parse::<JoinCode>(), Err(CodeError::Empty));
        assert_eq!(" - ".parse::<JoinCode>(), Err(CodeError::Empty));
        assert_eq!(
            "K7QF2M-XD4P".parse::<JoinCode>(),
            Err(CodeError::Length { found: 10 })
        );
        assert_eq!(
            "K7QF2M-XD4P-RT9AA".parse::<JoinCode>(),
            Err(CodeError::Length { found: 15 })
        );
        assert_eq!(
            "K7QU2M-XD4P-RT9A".parse::<JoinCode>(),
            Err(CodeError::Character {
                ch: 'U',
                position: 4,
                part: Part::Routing
            })
        );
        let err = "K7QF2M-XD4P-R*9A".parse::<JoinCode>().unwrap_err();
        assert_eq!(
            err,
            CodeError::Character {
                ch: '*',
                position: 12,
                part: Part::Secret
            }
        );
        assert!(err.to_string().contains("secret part"), "{err}");
        assert!(matches!(
            "K7QF2M-XD4P-RT9é".parse::<JoinCode>(),
            Err(CodeError::Character { ch: 'é', .. })
        ));
    }

    #[test]
    fn secret_never_shows_in_debug() {
        let code: JoinCode = "K7QF2M-XD4P-RT9A".parse().unwrap();
        let dbg = format!("{code:?} {:?}", code.secret());
        assert!(!dbg.contains("XD4P"), "{dbg}");
    }

    #[test]
    fn secrets_use_40_bits() {
        assert_ne!(Secret::from_entropy(0), Secret::from_entropy(1 << 39));
        assert_eq!(Secret::from_entropy(0), Secret::from_entropy(1 << 40));
    }

    #[test]
    fn arbitrary_input_never_panics() {
        for s in [
            "\u{0}",
            "ℌℌℌℌℌℌℌℌℌℌℌℌℌℌ",
            "--------------",
            "K7QF2M\u{202e}XD4PRT9A",
        ] {
            let _ = s.parse::<JoinCode>();
        }
    }
}
