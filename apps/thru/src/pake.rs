//! Pairing handshake: SPAKE2 over the code's secret, bound to both peers' QUIC identities.
//!
//! Sans-IO: plain values in, plain values out. No sockets, no clock, no global RNG (the
//! caller passes a CSPRNG). [`crate::rendezvous`] carries the messages, through `thruserv`
//! `relay` payloads or a direct TCP exchange on a LAN; both use the same JSON form of
//! [`PairMsg`].
//!
//! ## Message flow
//!
//! ```text
//! joiner                                               host
//!  | ── hello{session, pake_B, fp_J, addrs_J} ─────────▶ |   SPAKE2 side B
//!  | ◀─ reply{pake_A, fp_H, addrs_H, mac_H} ──────────── |   SPAKE2 side A; host confirms first
//!  | ── confirm{mac_J} ─────────────────────────────────▶ |
//!  | ◀─ accepted ─────────────────────────────────────── |
//!  (either side, on any failure: abort{reason})
//! ```
//!
//! SPAKE2 (RustCrypto `spake2`, Ed25519 group) runs with the password
//! `routing id ‖ secret` and the identities `thruflux/1 host` / `thruflux/1 joiner`. Its
//! output `K` keys two confirmation MACs (BLAKE3 keyed hashes, one key per role derived
//! from `K`) over one transcript hash covering: the routing id, both SPAKE2 messages, the
//! host's certificate fingerprint and advertised addresses, and the joiner's fingerprint and
//! addresses. A server or relay that swaps or edits any of those makes the MACs disagree and
//! the pairing is refused; without the secret it cannot compute a matching MAC. Each side
//! checks the other's MAC in constant time (`blake3::Hash` equality).
//!
//! One attempt is one guess: a joiner that sends a hello and receives a reply has tested
//! exactly one candidate secret. The host charges every reply to a [`GuessBudget`] before
//! sending it, answers one `hello` at a time, and refunds only a valid `confirm`.
//!
//! What this module does not do: decide what to do after a failure (the rendezvous ends the
//! host session), time out (the caller does), or talk to QUIC (the engine pins
//! [`PeerInfo::fingerprint`]).

use std::net::SocketAddr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD as B64;
use flux_peer::stack::QuicStack;
use flux_quic::Fingerprint;
use flux_signal_proto::RoutingId;
use rand::{CryptoRng, RngCore};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use spake2::{Ed25519Group, Identity, Password, Spake2};

use crate::code::JoinCode;

/// Version of the pairing handshake carried in `hello`.
pub const VERSION: u32 = 1;
/// Most addresses a peer may advertise.
pub const MAX_ADDRS: usize = 32;

/// One pairing message. JSON: `{"t":"hello",...}`; binary fields are unpadded base64.
#[derive(Clone, Debug, Deserialize, Eq, PartialEq, Serialize)]
#[serde(tag = "t", rename_all = "snake_case")]
#[non_exhaustive]
pub enum PairMsg {
    /// Joiner → host: SPAKE2 side B, the joiner's identity and addresses.
    Hello {
        /// Handshake version, [`VERSION`].
        v: u32,
        /// The routing part of the code the joiner typed (LAN hosts check it first).
        session: RoutingId,
        /// SPAKE2 message.
        pake: Bytes,
        /// The joiner's QUIC certificate fingerprint.
        fp: Bytes,
        /// The joiner's QUIC addresses.
        addrs: Vec<SocketAddr>,
        /// The QUIC stack the joiner asked for (`--quic`); absent: whichever the host runs.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        quic: Option<String>,
    },
    /// Host → joiner: SPAKE2 side A, the host's identity and addresses, and its MAC.
    Reply {
        /// SPAKE2 message.
        pake: Bytes,
        /// The host's QUIC certificate fingerprint.
        fp: Bytes,
        /// The host's QUIC addresses.
        addrs: Vec<SocketAddr>,
        /// The host's confirmation MAC over the transcript.
        mac: Bytes,
        /// The QUIC stack the host runs; absent: quinn (hosts that offered no choice).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        quic: Option<String>,
    },
    /// Joiner → host: the joiner's confirmation MAC.
    Confirm {
        /// MAC over the transcript.
        mac: Bytes,
    },
    /// Host → joiner: the host verified the joiner; pairing is complete.
    Accepted,
    /// Either way: the sender gives up.
    Abort {
        /// Why.
        reason: AbortReason,
        /// With [`AbortReason::QuicStack`]: the stack the host runs, so the joiner can say
        /// which one to ask for.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        quic: Option<String>,
    },
}

impl PairMsg {
    /// An `abort` for `reason`.
    pub fn abort(reason: AbortReason) -> Self {
        Self::Abort { reason, quic: None }
    }

    /// The message's `t` tag, for errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Hello { .. } => "hello",
            Self::Reply { .. } => "reply",
            Self::Confirm { .. } => "confirm",
            Self::Accepted => "accepted",
            Self::Abort { .. } => "abort",
        }
    }

    /// Decodes a JSON payload.
    pub fn from_json(v: serde_json::Value) -> Result<Self, PakeError> {
        serde_json::from_value(v).map_err(|_| PakeError::Malformed("not a pairing message"))
    }

    /// Encodes as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        // Invariant: every field serializes infallibly.
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// Why a peer aborted.
#[derive(Clone, Copy, Debug, Deserialize, Eq, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum AbortReason {
    /// The other side's MAC did not verify: wrong code or tampering.
    ConfirmFailed,
    /// A message did not parse or was out of order.
    BadMessage,
    /// A LAN host was reached with a code for another session.
    WrongSession,
    /// The host accepts no more receivers.
    Full,
    /// Unsupported handshake version.
    Version,
    /// The joiner asked for a QUIC stack the host does not run.
    QuicStack,
    /// A reason this version does not know.
    #[serde(other)]
    Unknown,
}

impl std::fmt::Display for AbortReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::ConfirmFailed => "the confirmation did not verify (wrong code or tampering)",
            Self::BadMessage => "a malformed or unexpected pairing message",
            Self::WrongSession => "the join code is for another session",
            Self::Full => "the host accepts no more receivers",
            Self::Version => "incompatible pairing versions",
            Self::QuicStack => "the two sides asked for different QUIC stacks (--quic)",
            Self::Unknown => "an unknown reason",
        })
    }
}

/// Why a pairing handshake failed.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PakeError {
    /// The peer's confirmation MAC is wrong: the codes differ, or someone in between changed
    /// the handshake (a fingerprint, an address, a SPAKE2 message).
    #[error("the join code is wrong, or someone between the peers altered the handshake")]
    ConfirmFailed,
    /// The peer sent something that is not a valid message here.
    #[error("malformed message from the peer ({0})")]
    Malformed(&'static str),
    /// A valid message in the wrong place.
    #[error("expected {expected} from the peer, got {got}")]
    Unexpected {
        /// What the state machine waits for.
        expected: &'static str,
        /// What arrived.
        got: &'static str,
    },
    /// The peer gave up.
    #[error("the peer gave up: {0}")]
    PeerAborted(AbortReason),
    /// A LAN joiner reached this host with a code for another session (no guess spent).
    #[error("the join code is for another session")]
    WrongSession,
    /// Another handshake version.
    #[error("the peer speaks pairing version {0}, this thru speaks {VERSION}")]
    Version(u32),
    /// The joiner asked for a QUIC stack the host does not run (no guess spent).
    #[error(
        "the host runs the {host} QUIC stack and the joiner asked for {joiner} (--quic): \
         give both sides the same --quic, or leave the joiner's at auto"
    )]
    QuicStack {
        /// The host's stack.
        host: QuicStack,
        /// The joiner's choice.
        joiner: QuicStack,
    },
}

impl PakeError {
    /// The `abort` to send the peer when this side gives up (a host names its stack).
    pub fn abort_msg(&self) -> PairMsg {
        match self {
            Self::QuicStack { host, .. } => PairMsg::Abort {
                reason: AbortReason::QuicStack,
                quic: Some(host.name().to_owned()),
            },
            _ => PairMsg::abort(self.abort_reason()),
        }
    }

    /// What to tell the peer when this side gives up.
    pub fn abort_reason(&self) -> AbortReason {
        match self {
            Self::ConfirmFailed => AbortReason::ConfirmFailed,
            Self::Version(_) => AbortReason::Version,
            Self::WrongSession => AbortReason::WrongSession,
            Self::QuicStack { .. } => AbortReason::QuicStack,
            Self::PeerAborted(r) => *r,
            Self::Malformed(_) | Self::Unexpected { .. } => AbortReason::BadMessage,
        }
    }
}

/// What one side brings to the handshake: its QUIC identity, addresses and stack.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct LocalInfo {
    /// Fingerprint of this side's QUIC certificate.
    pub fingerprint: Fingerprint,
    /// Addresses where this side's QUIC socket can be reached, best first.
    pub addrs: Vec<SocketAddr>,
    /// The QUIC stack: the one a host runs (`None` there means quinn), or the one a joiner
    /// asks for (`None`: whichever the host runs).
    pub quic: Option<QuicStack>,
}

/// What a successful handshake proves about the peer.
#[derive(Clone, Eq, PartialEq)]
pub struct PeerInfo {
    /// The peer's QUIC certificate fingerprint: pin it.
    pub fingerprint: Fingerprint,
    /// The peer's advertised QUIC addresses, as authenticated.
    pub addrs: Vec<SocketAddr>,
    /// The QUIC stack both sides run (the host's, which the joiner agreed to).
    pub quic: QuicStack,
    /// A key both sides share and nobody else has, bound to the whole transcript (for an
    /// optional exporter-bound confirmation inside QUIC).
    pub session_key: [u8; 32],
}

impl std::fmt::Debug for PeerInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerInfo")
            .field("fingerprint", &hex(&self.fingerprint))
            .field("addrs", &self.addrs)
            .finish_non_exhaustive()
    }
}

/// Joiner side, before the host's reply.
pub struct JoinerStart {
    spake: Spake2<Ed25519Group>,
    routing: RoutingId,
    local: LocalInfo,
    my_pake: Vec<u8>,
}

impl JoinerStart {
    /// Starts the joiner side; send the returned `hello`.
    pub fn start(
        code: &JoinCode,
        local: LocalInfo,
        rng: &mut (impl CryptoRng + RngCore),
    ) -> (Self, PairMsg) {
        let (spake, my_pake) = Spake2::<Ed25519Group>::start_b_with_rng(
            &password(code),
            &Identity::new(ID_HOST),
            &Identity::new(ID_JOINER),
            rng,
        );
        let hello = PairMsg::Hello {
            v: VERSION,
            session: code.routing(),
            pake: Bytes(my_pake.clone()),
            fp: Bytes(local.fingerprint.to_vec()),
            addrs: local.addrs.clone(),
            quic: local.quic.map(|q| q.name().to_owned()),
        };
        let me = Self {
            spake,
            routing: code.routing(),
            local,
            my_pake,
        };
        (me, hello)
    }

    /// Handles the host's `reply`: checks the host's MAC and returns the `confirm` to send.
    pub fn handle_reply(self, msg: PairMsg) -> Result<(JoinerAwaitAccept, PairMsg), PakeError> {
        let (pake, fp, addrs, mac, quic) = match msg {
            PairMsg::Reply {
                pake,
                fp,
                addrs,
                mac,
                quic,
            } => (pake, fp, addrs, mac, quic),
            PairMsg::Abort {
                reason: AbortReason::QuicStack,
                quic: Some(host),
            } => {
                return Err(match (stack(Some(&host)), self.local.quic) {
                    (Ok(host), Some(joiner)) => PakeError::QuicStack { host, joiner },
                    _ => PakeError::PeerAborted(AbortReason::QuicStack),
                });
            }
            PairMsg::Abort { reason, .. } => return Err(PakeError::PeerAborted(reason)),
            other => {
                return Err(PakeError::Unexpected {
                    expected: "reply",
                    got: other.kind(),
                });
            }
        };
        let host_fp = fingerprint(&fp)?;
        check_addrs(&addrs)?;
        let mac = mac32(&mac)?;
        let host_quic = stack(quic.as_deref())?;
        if let Some(joiner) = self.local.quic
            && joiner != host_quic
        {
            return Err(PakeError::QuicStack {
                host: host_quic,
                joiner,
            });
        }
        let key = self
            .spake
            .finish(&pake.0)
            .map_err(|_| PakeError::Malformed("bad SPAKE2 message"))?;
        let transcript = transcript(
            self.routing,
            &pake.0,
            &self.my_pake,
            (&host_fp, &addrs[..], Some(host_quic)),
            (
                &self.local.fingerprint,
                &self.local.addrs[..],
                self.local.quic,
            ),
        );
        let keys = Keys::derive(&key, &transcript);
        if blake3::Hash::from(mac) != keys.mac(Side::Host, &transcript) {
            return Err(PakeError::ConfirmFailed);
        }
        let confirm = PairMsg::Confirm {
            mac: Bytes(keys.mac(Side::Joiner, &transcript).as_bytes().to_vec()),
        };
        let peer = PeerInfo {
            fingerprint: host_fp,
            addrs,
            quic: host_quic,
            session_key: keys.session,
        };
        Ok((JoinerAwaitAccept { peer }, confirm))
    }
}

/// Joiner side, after sending `confirm`.
#[derive(Debug)]
pub struct JoinerAwaitAccept {
    peer: PeerInfo,
}

impl JoinerAwaitAccept {
    /// The host as the verified reply describes it.
    pub fn peer(&self) -> &PeerInfo {
        &self.peer
    }

    /// Handles the host's last word: `accepted` completes the pairing.
    pub fn handle_accepted(self, msg: PairMsg) -> Result<PeerInfo, PakeError> {
        match msg {
            PairMsg::Accepted => Ok(self.peer),
            PairMsg::Abort { reason, .. } => Err(PakeError::PeerAborted(reason)),
            other => Err(PakeError::Unexpected {
                expected: "accepted",
                got: other.kind(),
            }),
        }
    }
}

/// Host side, after answering a `hello`.
pub struct HostAwaitConfirm {
    expected: blake3::Hash,
    peer: PeerInfo,
}

impl HostAwaitConfirm {
    /// Answers a joiner's `hello`: returns the state and the `reply` to send.
    ///
    /// A `hello` naming another session fails with
    /// [`PakeError::WrongSession`] before any SPAKE2 work,
    /// so it costs no guess.
    pub fn respond(
        code: &JoinCode,
        local: &LocalInfo,
        hello: PairMsg,
        rng: &mut (impl CryptoRng + RngCore),
    ) -> Result<(Self, PairMsg), PakeError> {
        let (v, session, pake, fp, addrs, quic) = match hello {
            PairMsg::Hello {
                v,
                session,
                pake,
                fp,
                addrs,
                quic,
            } => (v, session, pake, fp, addrs, quic),
            PairMsg::Abort { reason, .. } => return Err(PakeError::PeerAborted(reason)),
            other => {
                return Err(PakeError::Unexpected {
                    expected: "hello",
                    got: other.kind(),
                });
            }
        };
        if v != VERSION {
            return Err(PakeError::Version(v));
        }
        if session != code.routing() {
            return Err(PakeError::WrongSession);
        }
        // Before any SPAKE2 work: a joiner that wants another stack costs no guess.
        let host_quic = local.quic.unwrap_or_default();
        let joiner_quic = match quic {
            None => None,
            Some(q) => Some(stack(Some(&q))?),
        };
        if let Some(joiner) = joiner_quic
            && joiner != host_quic
        {
            return Err(PakeError::QuicStack {
                host: host_quic,
                joiner,
            });
        }
        let joiner_fp = fingerprint(&fp)?;
        check_addrs(&addrs)?;
        let (spake, my_pake) = Spake2::<Ed25519Group>::start_a_with_rng(
            &password(code),
            &Identity::new(ID_HOST),
            &Identity::new(ID_JOINER),
            rng,
        );
        let key = spake
            .finish(&pake.0)
            .map_err(|_| PakeError::Malformed("bad SPAKE2 message"))?;
        let transcript = transcript(
            code.routing(),
            &my_pake,
            &pake.0,
            (&local.fingerprint, &local.addrs[..], Some(host_quic)),
            (&joiner_fp, &addrs[..], joiner_quic),
        );
        let keys = Keys::derive(&key, &transcript);
        let reply = PairMsg::Reply {
            pake: Bytes(my_pake),
            fp: Bytes(local.fingerprint.to_vec()),
            addrs: local.addrs.clone(),
            mac: Bytes(keys.mac(Side::Host, &transcript).as_bytes().to_vec()),
            quic: Some(host_quic.name().to_owned()),
        };
        let me = Self {
            expected: keys.mac(Side::Joiner, &transcript),
            peer: PeerInfo {
                fingerprint: joiner_fp,
                addrs,
                quic: host_quic,
                session_key: keys.session,
            },
        };
        Ok((me, reply))
    }

    /// Handles the joiner's `confirm`; on success send the returned `accepted`.
    pub fn handle_confirm(self, msg: PairMsg) -> Result<(PeerInfo, PairMsg), PakeError> {
        match msg {
            PairMsg::Confirm { mac } => {
                if blake3::Hash::from(mac32(&mac)?) == self.expected {
                    Ok((self.peer, PairMsg::Accepted))
                } else {
                    Err(PakeError::ConfirmFailed)
                }
            }
            PairMsg::Abort { reason, .. } => Err(PakeError::PeerAborted(reason)),
            other => Err(PakeError::Unexpected {
                expected: "confirm",
                got: other.kind(),
            }),
        }
    }

    /// The joiner's claimed fingerprint (not yet verified).
    pub fn claimed_peer(&self) -> &PeerInfo {
        &self.peer
    }
}

impl std::fmt::Debug for HostAwaitConfirm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HostAwaitConfirm")
    }
}

impl std::fmt::Debug for JoinerStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JoinerStart")
    }
}

/// The host's budget of online guesses: every `reply` it sends is one full password test
/// for whoever sent the `hello`, so every reply is charged here *before* it goes out, and
/// only a joiner that then proves the secret (a valid `confirm`) gets its charge back.
///
/// At most one handshake is in flight at a time: a second `hello` waits (the rendezvous
/// queues it, without answering) until the first one is settled. So at any moment the
/// replies sent that did not end in a pairing are at most `max_failed`; with the default of
/// 1, the first failed attempt, of any kind (wrong MAC, abort, disconnect, the joiner
/// reported gone by the server for whatever reason, timeout), burns the code.
///
/// Plain state, no I/O, no clock.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct GuessBudget {
    max_failed: u32,
    /// Replies sent that did not (yet) end in a pairing, the one in flight included.
    charged: u32,
    in_flight: bool,
    /// Pairing is over: no reply goes out any more.
    closed: bool,
}

/// Why [`GuessBudget::begin`] refused to let a reply go out.
#[derive(Clone, Copy, Debug, Eq, PartialEq, thiserror::Error)]
pub enum GuessRefused {
    /// Another joiner's handshake is in flight: wait until it is settled.
    #[error("another pairing handshake is in progress")]
    Busy,
    /// The failed attempts used the whole budget: the code is burned.
    #[error(
        "the join code is burned after {}",
        crate::ui::plural(u64::from(*.0), "failed attempt", "failed attempts")
    )]
    Spent(u32),
    /// The host stopped pairing.
    #[error("the host no longer pairs")]
    Closed,
}

impl GuessBudget {
    /// A budget of `max_failed` failed attempts (0 is read as 1).
    pub fn new(max_failed: u32) -> Self {
        Self {
            max_failed: max_failed.max(1),
            charged: 0,
            in_flight: false,
            closed: false,
        }
    }

    /// Whether a reply may go out now; does not charge.
    pub fn check(&self) -> Result<(), GuessRefused> {
        if self.closed {
            Err(GuessRefused::Closed)
        } else if self.charged >= self.max_failed {
            Err(GuessRefused::Spent(self.charged))
        } else if self.in_flight {
            Err(GuessRefused::Busy)
        } else {
            Ok(())
        }
    }

    /// Charges one guess for a reply about to be sent; refuses when busy or spent.
    pub fn begin(&mut self) -> Result<(), GuessRefused> {
        self.check()?;
        self.charged += 1;
        self.in_flight = true;
        Ok(())
    }

    /// The handshake in flight ended with a valid confirmation: its charge is given back.
    pub fn succeeded(&mut self) {
        if self.in_flight {
            self.in_flight = false;
            self.charged = self.charged.saturating_sub(1);
        }
    }

    /// The handshake in flight ended any other way: the charge stays. True when the budget
    /// is now spent (end the session).
    pub fn failed(&mut self) -> bool {
        self.in_flight = false;
        self.spent()
    }

    /// Whether a handshake is in flight.
    pub fn in_flight(&self) -> bool {
        self.in_flight
    }

    /// Failed attempts so far (the one in flight included).
    pub fn charged(&self) -> u32 {
        self.charged
    }

    /// Whether the failed attempts used the whole budget.
    pub fn spent(&self) -> bool {
        self.charged >= self.max_failed
    }

    /// Pairing is over: every later [`GuessBudget::begin`] is refused.
    pub fn close(&mut self) {
        self.closed = true;
    }
}

/// Binary data, unpadded base64 in JSON; at most [`Bytes::MAX`] bytes.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Bytes(pub Vec<u8>);

impl Bytes {
    /// Longest accepted value (SPAKE2 messages are 33 bytes, MACs and fingerprints 32).
    pub const MAX: usize = 64;
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&B64.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        if s.len() > Self::MAX * 2 {
            return Err(serde::de::Error::custom("binary field too long"));
        }
        B64.decode(s.as_bytes())
            .map(Bytes)
            .map_err(|_| serde::de::Error::custom("invalid base64"))
    }
}

/// Lower-case hex of a fingerprint, for display and JSON.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const ID_HOST: &[u8] = b"thruflux/1 host";
const ID_JOINER: &[u8] = b"thruflux/1 joiner";
const CTX_TRANSCRIPT: &str = "thruflux pairing v1 transcript";
const CTX_MAC_HOST: &str = "thruflux pairing v1 host confirmation";
const CTX_MAC_JOINER: &str = "thruflux pairing v1 joiner confirmation";
const CTX_SESSION: &str = "thruflux pairing v1 session key";

#[derive(Clone, Copy)]
enum Side {
    Host,
    Joiner,
}

struct Keys {
    host: [u8; 32],
    joiner: [u8; 32],
    session: [u8; 32],
}

impl Keys {
    fn derive(pake_key: &[u8], transcript: &blake3::Hash) -> Self {
        let mut session_material = pake_key.to_vec();
        session_material.extend_from_slice(transcript.as_bytes());
        Self {
            host: blake3::derive_key(CTX_MAC_HOST, pake_key),
            joiner: blake3::derive_key(CTX_MAC_JOINER, pake_key),
            session: blake3::derive_key(CTX_SESSION, &session_material),
        }
    }

    fn mac(&self, side: Side, transcript: &blake3::Hash) -> blake3::Hash {
        let key = match side {
            Side::Host => &self.host,
            Side::Joiner => &self.joiner,
        };
        blake3::keyed_hash(key, transcript.as_bytes())
    }
}

fn password(code: &JoinCode) -> Password {
    let mut p = code.routing().as_str().as_bytes().to_vec();
    p.push(b':');
    p.extend_from_slice(code.secret().as_bytes());
    Password::new(p)
}

/// One side's part of the transcript: fingerprint, addresses, QUIC stack.
type Part<'a> = (&'a Fingerprint, &'a [SocketAddr], Option<QuicStack>);

/// The transcript hash: every field length-prefixed, in a fixed order.
fn transcript(
    routing: RoutingId,
    host_pake: &[u8],
    joiner_pake: &[u8],
    host: Part<'_>,
    joiner: Part<'_>,
) -> blake3::Hash {
    let mut h = blake3::Hasher::new_derive_key(CTX_TRANSCRIPT);
    let mut field = |b: &[u8]| {
        h.update(&(b.len() as u64).to_le_bytes());
        h.update(b);
    };
    field(routing.as_str().as_bytes());
    field(host_pake);
    field(joiner_pake);
    for (fp, addrs, quic) in [host, joiner] {
        field(fp);
        field(&(addrs.len() as u64).to_le_bytes());
        for a in addrs {
            field(a.to_string().as_bytes());
        }
        // A server that rewrites either side's stack (to fail the connection later) breaks
        // the MACs instead.
        field(quic.map_or("auto", QuicStack::name).as_bytes());
    }
    h.finalize()
}

/// The stack a message names (absent: quinn, the stack of hosts that offered no choice).
fn stack(name: Option<&str>) -> Result<QuicStack, PakeError> {
    match name {
        None => Ok(QuicStack::Quinn),
        Some(n) => n
            .parse()
            .map_err(|_| PakeError::Malformed("unknown QUIC stack")),
    }
}

fn fingerprint(b: &Bytes) -> Result<Fingerprint, PakeError> {
    b.0.as_slice()
        .try_into()
        .map_err(|_| PakeError::Malformed("a fingerprint is 32 bytes"))
}

fn mac32(b: &Bytes) -> Result<[u8; 32], PakeError> {
    b.0.as_slice()
        .try_into()
        .map_err(|_| PakeError::Malformed("a MAC is 32 bytes"))
}

fn check_addrs(addrs: &[SocketAddr]) -> Result<(), PakeError> {
    if addrs.len() > MAX_ADDRS {
        return Err(PakeError::Malformed("too many addresses"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use rand::rngs::OsRng;

    use super::*;

    fn local(seed: u8, port: u16) -> LocalInfo {
        LocalInfo {
            fingerprint: [seed; 32],
            addrs: vec![
                SocketAddr::from(([192, 168, 1, seed], port)),
                SocketAddr::from(([127, 0, 0, 1], port)),
            ],
            quic: None,
        }
    }

    /// Runs the whole exchange, passing each message through `tamper` (which may edit it).
    fn run(
        host_code: &JoinCode,
        joiner_code: &JoinCode,
        tamper: impl FnMut(&mut PairMsg),
    ) -> (Result<PeerInfo, PakeError>, Result<PeerInfo, PakeError>) {
        run_with(host_code, joiner_code, (None, None), tamper)
    }

    /// [`run`], with the host's stack and the joiner's choice.
    fn run_with(
        host_code: &JoinCode,
        joiner_code: &JoinCode,
        (host_quic, joiner_quic): (Option<QuicStack>, Option<QuicStack>),
        mut tamper: impl FnMut(&mut PairMsg),
    ) -> (Result<PeerInfo, PakeError>, Result<PeerInfo, PakeError>) {
        let host = LocalInfo {
            quic: host_quic,
            ..local(1, 4000)
        };
        let joiner = LocalInfo {
            quic: joiner_quic,
            ..local(2, 5000)
        };
        let (j, mut hello) = JoinerStart::start(joiner_code, joiner.clone(), &mut OsRng);
        tamper(&mut hello);
        let (h, mut reply) = match HostAwaitConfirm::respond(host_code, &host, hello, &mut OsRng) {
            Ok(x) => x,
            Err(e) => {
                // The host aborts; the joiner sees that abort instead of a reply.
                let mut abort = e.abort_msg();
                tamper(&mut abort);
                return (Err(e), j.handle_reply(abort).map(|x| x.0.peer().clone()));
            }
        };
        tamper(&mut reply);
        let (j, mut confirm) = match j.handle_reply(reply) {
            Ok(x) => x,
            Err(e) => {
                // The joiner aborts; the host sees that abort instead of a confirm.
                return (h.handle_confirm(e.abort_msg()).map(|x| x.0), Err(e));
            }
        };
        tamper(&mut confirm);
        match h.handle_confirm(confirm) {
            Ok((peer_of_host, mut accepted)) => {
                tamper(&mut accepted);
                (Ok(peer_of_host), j.handle_accepted(accepted))
            }
            Err(e) => {
                let abort = e.abort_msg();
                (Err(e), j.handle_accepted(abort))
            }
        }
    }

    fn code(s: &str) -> JoinCode {
        s.parse().unwrap()
    }

    #[test]
    fn right_code_pairs_and_each_side_learns_the_other() {
        let c = code("K7QF2M-XD4P-RT9A");
        let (h, j) = run(&c, &c, |_| {});
        let (h, j) = (h.unwrap(), j.unwrap());
        assert_eq!(
            h.fingerprint, [2; 32],
            "host learns the joiner's fingerprint"
        );
        assert_eq!(
            j.fingerprint, [1; 32],
            "joiner learns the host's fingerprint"
        );
        assert_eq!(h.addrs, local(2, 5000).addrs);
        assert_eq!(j.addrs, local(1, 4000).addrs);
        assert_eq!(h.session_key, j.session_key);
    }

    #[test]
    fn the_joiner_takes_the_hosts_stack_unless_it_asked_for_another() {
        let c = code("K7QF2M-XD4P-RT9A");
        use QuicStack::{Quinn, S2n};
        for (host, joiner, agreed) in [
            (None, None, Quinn),
            (Some(S2n), None, S2n),
            (Some(S2n), Some(S2n), S2n),
            (Some(Quinn), Some(Quinn), Quinn),
            (None, Some(Quinn), Quinn),
        ] {
            let (h, j) = run_with(&c, &c, (host, joiner), |_| {});
            let (h, j) = (h.unwrap(), j.unwrap());
            assert_eq!((h.quic, j.quic), (agreed, agreed), "{host:?} / {joiner:?}");
        }
    }

    #[test]
    fn different_stacks_are_refused_naming_both_before_any_guess() {
        let c = code("K7QF2M-XD4P-RT9A");
        let mut replies = 0;
        let (h, j) = run_with(
            &c,
            &c,
            (Some(QuicStack::S2n), Some(QuicStack::Quinn)),
            |m| replies += usize::from(matches!(m, PairMsg::Reply { .. })),
        );
        let both = PakeError::QuicStack {
            host: QuicStack::S2n,
            joiner: QuicStack::Quinn,
        };
        assert_eq!(h, Err(both.clone()));
        assert_eq!(j, Err(both.clone()));
        assert_eq!(replies, 0, "no reply, so no guess, for a stack mismatch");
        let text = both.to_string();
        assert!(text.contains("s2n") && text.contains("quinn"), "{text}");
    }

    #[test]
    fn a_server_that_rewrites_a_stack_breaks_the_pairing() {
        let c = code("K7QF2M-XD4P-RT9A");
        // The host runs s2n; a relay tells the joiner (who asked for nothing) it is quinn.
        let (h, j) = run_with(&c, &c, (Some(QuicStack::S2n), None), |m| {
            if let PairMsg::Reply { quic, .. } = m {
                *quic = Some("quinn".into());
            }
        });
        assert!(h.is_err() && j.is_err(), "{h:?} / {j:?}");
        // ...or drops the joiner's request, so the host would not check it.
        let (h, j) = run_with(&c, &c, (Some(QuicStack::S2n), Some(QuicStack::S2n)), |m| {
            if let PairMsg::Hello { quic, .. } = m {
                *quic = None;
            }
        });
        assert!(h.is_err() && j.is_err(), "{h:?} / {j:?}");
    }

    #[test]
    fn wrong_secret_fails_on_both_sides() {
        let (h, j) = run(&code("K7QF2M-XD4P-RT9A"), &code("K7QF2M-XD4P-RT9B"), |_| {});
        assert_eq!(j, Err(PakeError::ConfirmFailed));
        assert_eq!(h, Err(PakeError::PeerAborted(AbortReason::ConfirmFailed)));
    }

    #[test]
    fn other_session_is_refused_before_any_guess() {
        let (h, _) = run(&code("K7QF2M-XD4P-RT9A"), &code("K7QF2N-XD4P-RT9A"), |_| {});
        assert_eq!(h, Err(PakeError::WrongSession));
    }

    #[test]
    fn every_tampered_field_is_detected() {
        let c = code("K7QF2M-XD4P-RT9A");
        type Edit = fn(&mut PairMsg);
        let edits: &[(&str, Edit)] = &[
            ("joiner fingerprint", |m| {
                if let PairMsg::Hello { fp, .. } = m {
                    fp.0[0] ^= 1;
                }
            }),
            ("joiner addresses", |m| {
                if let PairMsg::Hello { addrs, .. } = m {
                    addrs[0] = "203.0.113.9:5000".parse().unwrap();
                }
            }),
            ("joiner address dropped", |m| {
                if let PairMsg::Hello { addrs, .. } = m {
                    addrs.pop();
                }
            }),
            ("host fingerprint", |m| {
                if let PairMsg::Reply { fp, .. } = m {
                    fp.0[31] ^= 0x80;
                }
            }),
            ("host addresses", |m| {
                if let PairMsg::Reply { addrs, .. } = m {
                    addrs.push("203.0.113.9:4000".parse().unwrap());
                }
            }),
            ("host MAC", |m| {
                if let PairMsg::Reply { mac, .. } = m {
                    mac.0[5] ^= 1;
                }
            }),
            ("joiner MAC", |m| {
                if let PairMsg::Confirm { mac } = m {
                    mac.0[0] ^= 1;
                }
            }),
        ];
        for (what, edit) in edits {
            let (h, j) = run(&c, &c, edit);
            assert!(h.is_err(), "{what}: host accepted");
            assert!(j.is_err(), "{what}: joiner accepted");
        }
    }

    #[test]
    fn a_relay_that_runs_its_own_spake2_is_refused() {
        // A man in the middle replaces the SPAKE2 messages with its own, made with a guessed
        // secret, and keeps the MACs: both sides refuse.
        let real = code("K7QF2M-XD4P-RT9A");
        let guess = code("K7QF2M-0000-0000");
        let (_, mitm_b) = JoinerStart::start(&guess, local(9, 9), &mut OsRng);
        let PairMsg::Hello { pake: fake_b, .. } = mitm_b else {
            unreachable!()
        };
        let (h, j) = run(&real, &real, |m| {
            if let PairMsg::Hello { pake, .. } = m {
                *pake = fake_b.clone();
            }
        });
        assert!(h.is_err() && j.is_err());
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        let c = code("K7QF2M-XD4P-RT9A");
        let host = local(1, 4000);
        for json in [
            serde_json::json!({"t":"hello"}),
            serde_json::json!({"t":"hello","v":1,"session":"K7QF2M","pake":"!!","fp":"","addrs":[]}),
            serde_json::json!({"t":"nope"}),
            serde_json::json!("text"),
            serde_json::json!({"t":"hello","v":1,"session":"K7QF2M","pake":"AAAA","fp":"AAAA","addrs":[]}),
            serde_json::json!({"t":"hello","v":1,"session":"K7QF2M","pake":"A".repeat(500),"fp":"AAAA","addrs":[]}),
        ] {
            let res = PairMsg::from_json(json.clone())
                .and_then(|m| HostAwaitConfirm::respond(&c, &host, m, &mut OsRng));
            assert!(res.is_err(), "{json}");
        }
        let (_, hello) = JoinerStart::start(&c, local(2, 1), &mut OsRng);
        let mut v = hello.to_json();
        v["v"] = 7.into();
        let err = HostAwaitConfirm::respond(&c, &host, PairMsg::from_json(v).unwrap(), &mut OsRng)
            .unwrap_err();
        assert_eq!(err, PakeError::Version(7));
        let too_many: Vec<SocketAddr> = (0..40u16)
            .map(|p| SocketAddr::from(([10, 0, 0, 1], p + 1)))
            .collect();
        let (_, hello) = JoinerStart::start(
            &c,
            LocalInfo {
                fingerprint: [3; 32],
                addrs: too_many,
                quic: None,
            },
            &mut OsRng,
        );
        assert!(HostAwaitConfirm::respond(&c, &host, hello, &mut OsRng).is_err());
    }

    #[test]
    fn guess_budget_charges_every_reply_and_allows_one_in_flight() {
        let mut b = GuessBudget::new(1);
        assert_eq!(b.begin(), Ok(()));
        // A second hello while the first is in flight gets no reply.
        assert_eq!(b.begin(), Err(GuessRefused::Spent(1)));
        b.succeeded();
        assert!(!b.spent());
        assert_eq!(b.begin(), Ok(()));
        assert!(b.failed(), "the first failure burns a budget of 1");
        assert_eq!(b.begin(), Err(GuessRefused::Spent(1)));
        assert_eq!(b.check(), Err(GuessRefused::Spent(1)));

        let mut b = GuessBudget::new(3);
        assert_eq!(b.begin(), Ok(()));
        assert_eq!(b.begin(), Err(GuessRefused::Busy));
        assert!(!b.failed());
        assert_eq!(b.begin(), Ok(()));
        assert!(!b.failed());
        assert_eq!(b.begin(), Ok(()));
        assert!(b.failed());
        assert_eq!(b.charged(), 3);
        assert_eq!(b.begin(), Err(GuessRefused::Spent(3)));
        // A stray success report with nothing in flight refunds nothing.
        b.succeeded();
        assert!(b.spent());
        assert_eq!(GuessBudget::new(0), GuessBudget::new(1));

        let mut b = GuessBudget::new(2);
        b.close();
        assert_eq!(b.begin(), Err(GuessRefused::Closed));
    }

    #[test]
    fn messages_round_trip_through_json() {
        let c = code("K7QF2M-XD4P-RT9A");
        let (_, hello) = JoinerStart::start(&c, local(2, 1), &mut OsRng);
        let text = serde_json::to_string(&hello).unwrap();
        assert!(text.starts_with("{\"t\":\"hello\""), "{text}");
        assert!(!text.contains("XD4P"), "the secret never goes on the wire");
        assert_eq!(PairMsg::from_json(hello.to_json()).unwrap(), hello);
    }
}
