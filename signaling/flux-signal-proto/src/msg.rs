//! Message types, error codes and the panic-free decoders.

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{MAX_FOUNDATION_LEN, MAX_REASON_LEN, RoutingId};

/// A peer's number inside one session, assigned by the server. The host is always
/// [`PeerId::HOST`]; joiners get 1, 2, 3… in join order and numbers are never reused
/// within a session.
#[derive(Clone, Copy, Debug, Deserialize, Eq, Hash, Ord, PartialEq, PartialOrd, Serialize)]
#[serde(transparent)]
pub struct PeerId(pub u32);

impl PeerId {
    /// The session's host.
    pub const HOST: PeerId = PeerId(0);
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A message from a client (host or joiner) to the server.
///
/// Unknown fields are ignored, so later minor additions stay compatible.
#[derive(Clone, Debug, Deserialize, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ClientMsg {
    /// Open a session and become its host. Answered by [`ServerMsg::SessionCreated`].
    CreateSession,
    /// Join an existing session. Answered by [`ServerMsg::Joined`].
    JoinSession {
        /// The routing part of the join code.
        session: RoutingId,
    },
    /// Send one ICE candidate to a peer of the session. The server checks the address
    /// ([`crate::check_candidate_addr`]) and drops it with `candidate_rejected` if needed.
    Candidate {
        /// Recipient. A joiner may only address [`PeerId::HOST`].
        to: PeerId,
        /// The candidate.
        candidate: Candidate,
    },
    /// Send an opaque payload (PAKE message, handshake, file offer…) to a peer.
    Relay {
        /// Recipient. A joiner may only address [`PeerId::HOST`].
        to: PeerId,
        /// Any JSON value; binary data goes as a base64 string. The server does not read it.
        payload: Value,
    },
    /// Host only: this joiner failed authentication (wrong secret). The server disconnects
    /// it and counts a failed join; past the cap it closes the session.
    RejectPeer {
        /// The joiner to remove.
        peer: PeerId,
        /// Optional note for logs, at most [`MAX_REASON_LEN`] bytes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// Leave the session (a host leaving closes it). The server then closes the connection.
    Leave,
}

impl ClientMsg {
    /// The `type` tags this version knows.
    pub const TYPES: [&'static str; 6] = [
        "create_session",
        "join_session",
        "candidate",
        "relay",
        "reject_peer",
        "leave",
    ];

    /// JSON text of the message.
    pub fn encode(&self) -> String {
        // Invariant: every field serializes infallibly (string map keys, no non-finite
        // floats can exist in a `serde_json::Value`).
        serde_json::to_string(self).unwrap_or_default()
    }

    fn validate(&self) -> Result<(), DecodeError> {
        match self {
            Self::Candidate { candidate, .. }
                if candidate.foundation.len() > MAX_FOUNDATION_LEN =>
            {
                Err(DecodeError::InvalidMessage)
            }
            Self::RejectPeer {
                reason: Some(r), ..
            } if r.len() > MAX_REASON_LEN => Err(DecodeError::InvalidMessage),
            _ => Ok(()),
        }
    }
}

/// A message from the server to a client.
#[derive(Clone, Debug, Deserialize, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ServerMsg {
    /// First message on every connection.
    Welcome {
        /// [`crate::PROTOCOL_VERSION`] of the server.
        protocol: u32,
        /// Server name and version, for logs.
        server: String,
        /// Largest frame the server accepts; larger ones close the connection.
        max_message_bytes: u64,
    },
    /// The session exists and the sender is its host ([`PeerId::HOST`]).
    SessionCreated {
        /// The routing part of the join code.
        session: RoutingId,
        /// Always [`PeerId::HOST`].
        peer: PeerId,
        /// Most joiners connected at once.
        max_receivers: u32,
        /// Milliseconds until the server closes the session regardless of activity.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_in_ms: Option<u64>,
    },
    /// The sender joined a session.
    Joined {
        /// The session joined.
        session: RoutingId,
        /// The sender's own peer id.
        peer: PeerId,
        /// The host's peer id (always [`PeerId::HOST`]).
        host: PeerId,
    },
    /// Host only: a joiner arrived.
    PeerJoined {
        /// The new joiner.
        peer: PeerId,
    },
    /// Host only: a joiner is gone.
    PeerLeft {
        /// The joiner.
        peer: PeerId,
        /// Why.
        reason: PeerLeftReason,
    },
    /// A candidate from a peer (already checked by the server's address filter).
    Candidate {
        /// Sender.
        from: PeerId,
        /// The candidate.
        candidate: Candidate,
    },
    /// An opaque payload from a peer.
    Relay {
        /// Sender.
        from: PeerId,
        /// As sent.
        payload: Value,
    },
    /// The session is over; the server closes the connection next.
    SessionClosed {
        /// Why, one of the stable [`ErrorCode`]s.
        reason: ErrorCode,
    },
    /// A request was refused. When `fatal` the server closes the connection next.
    Error {
        /// Stable machine-readable code.
        code: ErrorCode,
        /// Human-readable detail; not stable.
        message: String,
        /// Whether the connection is being closed.
        fatal: bool,
    },
}

impl ServerMsg {
    /// JSON text of the message.
    pub fn encode(&self) -> String {
        // Invariant: as for `ClientMsg::encode`, serialization cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// One ICE candidate (RFC 8445 §5.1), as much as signaling needs.
#[derive(Clone, Debug, Deserialize, Eq, PartialEq, Serialize)]
pub struct Candidate {
    /// Transport address, e.g. `"203.0.113.7:40123"` or `"[2001:db8::1]:40123"`.
    pub addr: SocketAddr,
    /// Candidate type.
    pub kind: CandidateKind,
    /// Transport protocol; UDP when absent.
    #[serde(default)]
    pub protocol: TransportProtocol,
    /// ICE priority.
    pub priority: u32,
    /// ICE foundation, at most [`MAX_FOUNDATION_LEN`] bytes.
    pub foundation: String,
    /// Component id; 1 when absent.
    #[serde(default = "one")]
    pub component: u16,
    /// Related (base) address of reflexive and relayed candidates. Not filtered: it is
    /// informational and never a target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub related: Option<SocketAddr>,
}

fn one() -> u16 {
    1
}

/// ICE candidate type.
#[derive(Clone, Copy, Debug, Deserialize, Eq, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CandidateKind {
    /// A local interface address.
    Host,
    /// Server reflexive (learned from STUN).
    Srflx,
    /// Peer reflexive.
    Prflx,
    /// A TURN relay address.
    Relay,
}

/// Transport of a candidate.
#[derive(Clone, Copy, Debug, Default, Deserialize, Eq, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TransportProtocol {
    /// UDP (the default).
    #[default]
    Udp,
    /// TCP (RFC 6544).
    Tcp,
}

/// Why a joiner left a session.
#[derive(Clone, Copy, Debug, Deserialize, Eq, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum PeerLeftReason {
    /// It sent `leave` or closed its WebSocket.
    Left,
    /// Its connection failed or timed out.
    Disconnected,
    /// The host rejected it (`reject_peer`).
    Rejected,
    /// A code this version does not know.
    #[serde(other)]
    Unknown,
}

/// Stable error codes on the wire: in [`ServerMsg::Error`], [`ServerMsg::SessionClosed`],
/// WebSocket close reasons, and the JSON body of refused HTTP upgrades. The strings are the
/// `snake_case` variant names and never change meaning; see `PROTOCOL.md`.
#[derive(Clone, Copy, Debug, Deserialize, Eq, Hash, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// A text frame is not JSON (or nests deeper than the decoder's limit).
    InvalidJson,
    /// A text frame is not valid UTF-8.
    InvalidUtf8,
    /// JSON with an unknown `type`.
    UnknownType,
    /// Known `type`, wrong or missing fields.
    InvalidMessage,
    /// Binary frames are not part of the protocol.
    BinaryFrame,
    /// A frame larger than `max_message_bytes`.
    MessageTooLarge,
    /// A WebSocket protocol violation.
    ProtocolError,
    /// Too many messages per second on this connection.
    RateLimited,
    /// Too many WebSocket connects from this IP (HTTP 429).
    ConnectRateLimited,
    /// The server's connection cap is reached (HTTP 503).
    TooManyConnections,
    /// Too many session creates (or joins to unknown ids) from this IP.
    CreateRateLimited,
    /// The server's session cap is reached.
    TooManySessions,
    /// No session has this routing id.
    NoSuchSession,
    /// The session has its maximum number of joiners.
    SessionFull,
    /// `create_session`/`join_session` on a connection already in a session.
    AlreadyInSession,
    /// A session message on a connection that is in no session.
    NotInSession,
    /// The addressed peer is not in the session.
    NoSuchPeer,
    /// The sender's role may not do this (a joiner addressing a joiner or rejecting).
    NotAllowed,
    /// The session's message or candidate budget is spent.
    SessionQuotaExceeded,
    /// The sender's client IP spent its budget of relay bytes between peers that have not
    /// paired yet; it refills over a minute.
    PairingRateLimited,
    /// A candidate address was refused by the filter and not relayed.
    CandidateRejected,
    /// The recipient is not reading fast enough; the message was dropped.
    PeerBusy,
    /// No frame for longer than the idle timeout.
    IdleTimeout,
    /// A frame started but did not finish in time, or a write stalled.
    FrameTimeout,
    /// The session reached its absolute lifetime.
    SessionExpired,
    /// The host rejected too many joiners; the session is closed.
    TooManyFailedJoins,
    /// The host left; the session is closed.
    HostLeft,
    /// The host rejected this joiner.
    RejectedByHost,
    /// The server is shutting down.
    ServerShutdown,
    /// A plain HTTP request the server does not serve, or a malformed upgrade.
    BadRequest,
    /// The HTTP path does not exist.
    NotFound,
    /// The HTTP upgrade (or TLS handshake) was too slow.
    HandshakeTimeout,
    /// The server cannot reach its shared session store (a fleet's Redis): the request was
    /// not done, or (as a `session_closed` reason) the store lost the session. Try again
    /// shortly, or another server.
    StoreUnavailable,
    /// A code this version does not know (sent by a newer peer).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// Every code, for metrics.
    pub const ALL: [ErrorCode; 34] = [
        Self::InvalidJson,
        Self::InvalidUtf8,
        Self::UnknownType,
        Self::InvalidMessage,
        Self::BinaryFrame,
        Self::MessageTooLarge,
        Self::ProtocolError,
        Self::RateLimited,
        Self::ConnectRateLimited,
        Self::TooManyConnections,
        Self::CreateRateLimited,
        Self::TooManySessions,
        Self::NoSuchSession,
        Self::SessionFull,
        Self::AlreadyInSession,
        Self::NotInSession,
        Self::NoSuchPeer,
        Self::NotAllowed,
        Self::SessionQuotaExceeded,
        Self::PairingRateLimited,
        Self::CandidateRejected,
        Self::PeerBusy,
        Self::IdleTimeout,
        Self::FrameTimeout,
        Self::SessionExpired,
        Self::TooManyFailedJoins,
        Self::HostLeft,
        Self::RejectedByHost,
        Self::ServerShutdown,
        Self::BadRequest,
        Self::NotFound,
        Self::HandshakeTimeout,
        Self::StoreUnavailable,
        Self::Unknown,
    ];

    /// The wire string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::InvalidUtf8 => "invalid_utf8",
            Self::UnknownType => "unknown_type",
            Self::InvalidMessage => "invalid_message",
            Self::BinaryFrame => "binary_frame",
            Self::MessageTooLarge => "message_too_large",
            Self::ProtocolError => "protocol_error",
            Self::RateLimited => "rate_limited",
            Self::ConnectRateLimited => "connect_rate_limited",
            Self::TooManyConnections => "too_many_connections",
            Self::CreateRateLimited => "create_rate_limited",
            Self::TooManySessions => "too_many_sessions",
            Self::NoSuchSession => "no_such_session",
            Self::SessionFull => "session_full",
            Self::AlreadyInSession => "already_in_session",
            Self::NotInSession => "not_in_session",
            Self::NoSuchPeer => "no_such_peer",
            Self::NotAllowed => "not_allowed",
            Self::SessionQuotaExceeded => "session_quota_exceeded",
            Self::PairingRateLimited => "pairing_rate_limited",
            Self::CandidateRejected => "candidate_rejected",
            Self::PeerBusy => "peer_busy",
            Self::IdleTimeout => "idle_timeout",
            Self::FrameTimeout => "frame_timeout",
            Self::SessionExpired => "session_expired",
            Self::TooManyFailedJoins => "too_many_failed_joins",
            Self::HostLeft => "host_left",
            Self::RejectedByHost => "rejected_by_host",
            Self::ServerShutdown => "server_shutdown",
            Self::BadRequest => "bad_request",
            Self::NotFound => "not_found",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::StoreUnavailable => "store_unavailable",
            Self::Unknown => "unknown",
        }
    }

    /// The code for a wire string; [`ErrorCode::Unknown`] for strings this version lacks.
    pub fn from_wire(s: &str) -> Self {
        Self::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .unwrap_or(Self::Unknown)
    }

    /// The WebSocket close code (RFC 6455 §7.4.1) the server uses when this error ends a
    /// connection. The close reason text is always [`ErrorCode::as_str`].
    pub fn close_code(self) -> u16 {
        match self {
            Self::InvalidUtf8 => 1007,
            Self::BinaryFrame => 1003,
            Self::MessageTooLarge => 1009,
            Self::ProtocolError => 1002,
            Self::ServerShutdown => 1001,
            // The session store lost the session: the server's failure, not the client's.
            Self::StoreUnavailable => 1011,
            Self::HostLeft
            | Self::SessionExpired
            | Self::TooManyFailedJoins
            | Self::RejectedByHost => 1000,
            _ => 1008,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a text frame did not decode. Small and `Copy`: the connection answers it with
/// [`DecodeError::code`] and carries on or closes, it never panics.
#[derive(Clone, Copy, Debug, Eq, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Not JSON, or nested too deeply.
    #[error("not valid JSON")]
    InvalidJson,
    /// JSON whose `type` is not one this version knows.
    #[error("unknown message type")]
    UnknownType,
    /// A known type with missing, extra-long or wrongly typed fields.
    #[error("invalid message fields")]
    InvalidMessage,
}

impl DecodeError {
    /// The wire error code.
    pub fn code(self) -> ErrorCode {
        match self {
            Self::InvalidJson => ErrorCode::InvalidJson,
            Self::UnknownType => ErrorCode::UnknownType,
            Self::InvalidMessage => ErrorCode::InvalidMessage,
        }
    }
}

/// Decodes one client text frame.
///
/// serde_json's recursion limit (128) bounds nesting, so a deeply nested payload is
/// [`DecodeError::InvalidJson`], not a stack overflow.
pub fn decode_client(text: &str) -> Result<ClientMsg, DecodeError> {
    let msg: ClientMsg =
        serde_json::from_str(text).map_err(|e| classify(text, &e, &ClientMsg::TYPES))?;
    msg.validate()?;
    Ok(msg)
}

/// Decodes one server text frame. A client should skip [`DecodeError::UnknownType`]
/// (a newer server) and treat the others as a broken server.
pub fn decode_server(text: &str) -> Result<ServerMsg, DecodeError> {
    serde_json::from_str(text).map_err(|e| classify(text, &e, &SERVER_TYPES))
}

const SERVER_TYPES: [&str; 9] = [
    "welcome",
    "session_created",
    "joined",
    "peer_joined",
    "peer_left",
    "candidate",
    "relay",
    "session_closed",
    "error",
];

/// Tells malformed JSON from a well-formed message of an unknown or mistyped kind.
fn classify(text: &str, err: &serde_json::Error, known: &[&str]) -> DecodeError {
    use serde_json::error::Category;
    match err.classify() {
        Category::Syntax | Category::Eof | Category::Io => DecodeError::InvalidJson,
        Category::Data => {
            #[derive(Deserialize)]
            struct Probe {
                #[serde(rename = "type")]
                ty: String,
            }
            match serde_json::from_str::<Probe>(text) {
                Ok(p) if !known.contains(&p.ty.as_str()) => DecodeError::UnknownType,
                _ => DecodeError::InvalidMessage,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    #[test]
    fn decodes_each_client_type() {
        let id = RoutingId::from_entropy(42);
        let cases = [
            ClientMsg::CreateSession,
            ClientMsg::JoinSession { session: id },
            ClientMsg::Candidate {
                to: PeerId::HOST,
                candidate: Candidate {
                    addr: "203.0.113.1:5000".parse().unwrap(),
                    kind: CandidateKind::Srflx,
                    protocol: TransportProtocol::Udp,
                    priority: 7,
                    foundation: "f1".into(),
                    component: 1,
                    related: Some("192.168.1.2:5000".parse().unwrap()),
                },
            },
            ClientMsg::Relay {
                to: PeerId(3),
                payload: json!({"pake": "AAEC"}),
            },
            ClientMsg::RejectPeer {
                peer: PeerId(2),
                reason: Some("bad key".into()),
            },
            ClientMsg::Leave,
        ];
        assert_eq!(cases.len(), ClientMsg::TYPES.len());
        for msg in cases {
            let text = msg.encode();
            assert_eq!(decode_client(&text), Ok(msg), "{text}");
        }
    }

    #[test]
    fn wire_shape_is_stable() {
        assert_eq!(
            ClientMsg::CreateSession.encode(),
            r#"{"type":"create_session"}"#
        );
        let m =
            decode_client(r#"{"type":"relay","to":0,"payload":"aGk=","future_field":1}"#).unwrap();
        assert_eq!(
            m,
            ClientMsg::Relay {
                to: PeerId::HOST,
                payload: json!("aGk=")
            }
        );
        let e = ServerMsg::Error {
            code: ErrorCode::SessionFull,
            message: "x".into(),
            fatal: false,
        };
        assert_eq!(
            e.encode(),
            r#"{"type":"error","code":"session_full","message":"x","fatal":false}"#
        );
    }

    #[test]
    fn classifies_bad_input() {
        assert_eq!(decode_client("{not json"), Err(DecodeError::InvalidJson));
        assert_eq!(decode_client(""), Err(DecodeError::InvalidJson));
        // A top-level array is refused at its first element, before any recursion.
        let deep = "[".repeat(100_000);
        assert_eq!(decode_client(&deep), Err(DecodeError::InvalidMessage));
        let deep_map = r#"{"a":"#.repeat(100_000);
        assert_eq!(decode_client(&deep_map), Err(DecodeError::InvalidJson));
        let deep_payload = format!(
            r#"{{"type":"relay","to":0,"payload":{}}}"#,
            "[".repeat(10_000)
        );
        assert_eq!(decode_client(&deep_payload), Err(DecodeError::InvalidJson));
        assert_eq!(
            decode_client(r#"{"type":"teleport"}"#),
            Err(DecodeError::UnknownType)
        );
        assert_eq!(
            decode_client(r#"{"type":"relay","to":"host","payload":1}"#),
            Err(DecodeError::InvalidMessage)
        );
        assert_eq!(
            decode_client(r#"{"type":"join_session","session":12}"#),
            Err(DecodeError::InvalidMessage)
        );
        assert_eq!(
            decode_client(r#"{"type":"join_session","session":"TOOLONG1"}"#),
            Err(DecodeError::InvalidMessage)
        );
        assert_eq!(
            decode_client(r#"{"no_type":1}"#),
            Err(DecodeError::InvalidMessage)
        );
        assert_eq!(decode_client(r#"[1,2]"#), Err(DecodeError::InvalidMessage));
        let long = format!(
            r#"{{"type":"reject_peer","peer":1,"reason":"{}"}}"#,
            "x".repeat(MAX_REASON_LEN + 1)
        );
        assert_eq!(decode_client(&long), Err(DecodeError::InvalidMessage));
    }

    #[test]
    fn error_codes_round_trip() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_wire(code.as_str()), code);
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert_eq!(serde_json::from_str::<ErrorCode>(&json).unwrap(), code);
        }
        assert_eq!(
            serde_json::from_str::<ErrorCode>("\"brand_new\"").unwrap(),
            ErrorCode::Unknown
        );
    }

    proptest! {
        #[test]
        fn decode_arbitrary_text_never_panics(s in ".{0,200}") {
            let _ = decode_client(&s);
            let _ = decode_server(&s);
        }

        #[test]
        fn relay_round_trips(to in any::<u32>(), text in ".{0,64}", n in any::<i64>()) {
            let msg = ClientMsg::Relay { to: PeerId(to), payload: json!({"s": text, "n": n}) };
            prop_assert_eq!(decode_client(&msg.encode()), Ok(msg));
        }

        #[test]
        fn server_relay_round_trips(from in any::<u32>(), text in ".{0,64}") {
            let msg = ServerMsg::Relay { from: PeerId(from), payload: json!([text]) };
            prop_assert_eq!(decode_server(&msg.encode()), Ok(msg));
        }
    }
}
