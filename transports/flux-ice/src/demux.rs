//! First-byte demultiplexing of one UDP datagram (RFC 7983, updated for QUIC by RFC 9443).
//!
//! ```text
//!   first byte   what                      note
//!   0..=3        STUN                      ICE checks, STUN/TURN responses, Data indications
//!   64..=79      TURN ChannelData          only from a TURN server; from anyone else: QUIC
//!   64..=127     QUIC short header         the QUIC bit (0x40) is always set: we never
//!   192..=255    QUIC long header          negotiate grease_quic_bit on this socket
//!   anything else: Other (DTLS, RTP, ZRTP, a greased QUIC packet) — drop it
//! ```
//!
//! ChannelData and QUIC short headers share 64..=79 (RFC 9443 §5): the only way to tell them
//! apart is the source address, which is why [`classify`] takes `from_turn_server`. The engine
//! calls it per GRO segment, never per batch: GRO can append a short STUN check to a QUIC batch
//! from the same 5-tuple.

/// What one datagram (one GRO segment) is.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Packet {
    /// A STUN message: give it to [`crate::Agent::handle_datagram`].
    Stun,
    /// TURN ChannelData from a TURN server: give it to [`crate::Agent::handle_datagram`],
    /// which unwraps it.
    ChannelData,
    /// A QUIC packet: give it straight to QUIC.
    Quic,
    /// Anything else: drop it.
    Other,
}

/// Classifies one datagram by its first byte.
///
/// `from_turn_server` must be true only when the datagram came from the address of a TURN
/// server this agent uses over UDP ([`crate::Agent::classify`] works it out).
#[must_use]
pub fn classify(data: &[u8], from_turn_server: bool) -> Packet {
    let Some(&first) = data.first() else {
        return Packet::Other;
    };
    match first {
        0..=3 => Packet::Stun,
        64..=79 if from_turn_server => Packet::ChannelData,
        64..=127 | 192..=255 => Packet::Quic,
        _ => Packet::Other,
    }
}

/// Splits a ChannelData message (RFC 8656 §12.4) into its channel number and application
/// data, without copying. `None` when it is not well-formed: a channel number outside
/// 0x4000..=0x4FFF or a length field longer than the datagram. Trailing bytes (padding over
/// TCP) are ignored.
#[must_use]
pub fn channel_data(data: &[u8]) -> Option<(u16, &[u8])> {
    let header = data.get(..4)?;
    let channel = u16::from_be_bytes([header[0], header[1]]);
    let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    if !(0x4000..=0x4FFF).contains(&channel) {
        return None;
    }
    Some((channel, data.get(4..4 + len)?))
}

/// Writes a ChannelData header for `channel` and `len` bytes of data into `out[..4]`; the
/// engine can leave 4 bytes of headroom in front of a QUIC packet and wrap it in place.
/// Over a TCP or TLS stream, the message must then be padded to a multiple of 4 bytes.
pub fn channel_header(channel: u16, len: u16) -> [u8; 4] {
    let c = channel.to_be_bytes();
    let l = len.to_be_bytes();
    [c[0], c[1], l[0], l[1]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(classify(&[], false), Packet::Other);
        assert_eq!(classify(&[0x00, 0x01], false), Packet::Stun);
        assert_eq!(classify(&[0x03], true), Packet::Stun);
        assert_eq!(classify(&[0x40], true), Packet::ChannelData);
        assert_eq!(classify(&[0x4F], true), Packet::ChannelData);
        assert_eq!(classify(&[0x40], false), Packet::Quic);
        assert_eq!(classify(&[0x50], true), Packet::Quic);
        assert_eq!(classify(&[0x7F], false), Packet::Quic);
        assert_eq!(classify(&[0xC3], false), Packet::Quic);
        assert_eq!(classify(&[0x16], false), Packet::Other);
        assert_eq!(classify(&[0x80], false), Packet::Other);
        assert_eq!(classify(&[0x04], false), Packet::Other);
    }

    #[test]
    fn channel_data_parse() {
        let mut msg = channel_header(0x4001, 3).to_vec();
        msg.extend_from_slice(b"abc\0");
        assert_eq!(channel_data(&msg), Some((0x4001, &b"abc"[..])));
        assert_eq!(channel_data(&msg[..6]), None);
        assert_eq!(channel_data(&[0x3f, 0xff, 0, 0]), None);
        assert_eq!(channel_data(&[0x50, 0x00, 0, 0]), None);
        assert_eq!(channel_data(&[0x40]), None);
    }

    proptest::proptest! {
        #[test]
        fn never_panics(data: Vec<u8>, turn: bool) {
            let _ = classify(&data, turn);
            let _ = channel_data(&data);
        }
    }
}
