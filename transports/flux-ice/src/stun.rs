//! The little STUN this crate speaks itself: Binding requests to STUN servers for
//! server-reflexive candidates (RFC 8489 §6), which carry no MESSAGE-INTEGRITY — which is
//! exactly why the `is` codec (built for integrity-protected ICE checks) refuses them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

const MAGIC: u32 = 0x2112_A442;
const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const MAPPED_ADDRESS: u16 = 0x0001;
const XOR_MAPPED_ADDRESS: u16 = 0x0020;
const ERROR_CODE: u16 = 0x0009;
/// Allocate error response (RFC 8656 §7.2): method 0x003, class error.
pub(crate) const ALLOCATE_ERROR: u16 = 0x0113;

/// A Binding request without attributes.
pub(crate) fn binding_request(trans_id: [u8; 12]) -> Vec<u8> {
    let mut m = Vec::with_capacity(20);
    m.extend_from_slice(&BINDING_REQUEST.to_be_bytes());
    m.extend_from_slice(&0u16.to_be_bytes());
    m.extend_from_slice(&MAGIC.to_be_bytes());
    m.extend_from_slice(&trans_id);
    m
}

/// The transaction id of any well-formed STUN message header.
pub(crate) fn transaction_id(data: &[u8]) -> Option<[u8; 12]> {
    let header = data.get(..20)?;
    if header[4..8] != MAGIC.to_be_bytes() {
        return None;
    }
    header[8..20].try_into().ok()
}

/// The transaction id of a Binding request (a connectivity check we are about to send).
pub(crate) fn binding_request_id(data: &[u8]) -> Option<[u8; 12]> {
    let kind = u16::from_be_bytes([*data.first()?, *data.get(1)?]);
    (kind == BINDING_REQUEST)
        .then(|| transaction_id(data))
        .flatten()
}

/// The message type, error code and transaction id of a STUN error response (class 0b11), if
/// `data` is one.
pub(crate) fn error_response(data: &[u8]) -> Option<(u16, u16, [u8; 12])> {
    let header = data.get(..20)?;
    let kind = u16::from_be_bytes([header[0], header[1]]);
    let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    // Class bits are 0x0100 and 0x0010 of the type; both set = error response.
    if kind & 0x0110 != 0x0110 || header[4..8] != MAGIC.to_be_bytes() {
        return None;
    }
    let mut attrs = data.get(20..20 + len)?;
    while attrs.len() >= 4 {
        let t = u16::from_be_bytes([attrs[0], attrs[1]]);
        let l = usize::from(u16::from_be_bytes([attrs[2], attrs[3]]));
        let value = attrs.get(4..4 + l)?;
        if t == ERROR_CODE {
            let class = u16::from(*value.get(2)? & 0x07);
            let number = u16::from(*value.get(3)?);
            return Some((kind, class * 100 + number, header[8..20].try_into().ok()?));
        }
        attrs = attrs.get((4 + l).next_multiple_of(4)..).unwrap_or(&[]);
    }
    None
}

/// The transaction id and mapped address of a Binding success response; `None` for anything
/// else or anything malformed.
pub(crate) fn binding_success(data: &[u8]) -> Option<([u8; 12], SocketAddr)> {
    let header = data.get(..20)?;
    let kind = u16::from_be_bytes([header[0], header[1]]);
    let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    if kind != BINDING_SUCCESS || header[4..8] != MAGIC.to_be_bytes() || len % 4 != 0 {
        return None;
    }
    let trans_id: [u8; 12] = header[8..20].try_into().ok()?;
    let mut attrs = data.get(20..20 + len)?;
    let mut mapped = None;
    while attrs.len() >= 4 {
        let t = u16::from_be_bytes([attrs[0], attrs[1]]);
        let l = usize::from(u16::from_be_bytes([attrs[2], attrs[3]]));
        let value = attrs.get(4..4 + l)?;
        match t {
            XOR_MAPPED_ADDRESS => return Some((trans_id, address(value, Some(&trans_id))?)),
            MAPPED_ADDRESS => mapped = address(value, None),
            _ => {}
        }
        // Attributes are padded to 4 bytes.
        attrs = attrs.get((4 + l).next_multiple_of(4)..).unwrap_or(&[]);
    }
    Some((trans_id, mapped?))
}

fn address(v: &[u8], xor: Option<&[u8; 12]>) -> Option<SocketAddr> {
    let family = *v.get(1)?;
    let mut port = u16::from_be_bytes([*v.get(2)?, *v.get(3)?]);
    let cookie = MAGIC.to_be_bytes();
    if xor.is_some() {
        port ^= (MAGIC >> 16) as u16;
    }
    let ip = match family {
        0x01 => {
            let mut o: [u8; 4] = v.get(4..8)?.try_into().ok()?;
            if xor.is_some() {
                for (b, c) in o.iter_mut().zip(cookie) {
                    *b ^= c;
                }
            }
            IpAddr::V4(Ipv4Addr::from(o))
        }
        0x02 => {
            let mut o: [u8; 16] = v.get(4..20)?.try_into().ok()?;
            if let Some(t) = xor {
                let key = cookie.iter().chain(t.iter());
                for (b, k) in o.iter_mut().zip(key) {
                    *b ^= k;
                }
            }
            IpAddr::V6(Ipv6Addr::from(o))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(trans_id: [u8; 12], attr: u16, value: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&BINDING_SUCCESS.to_be_bytes());
        let padded = value.len().next_multiple_of(4);
        m.extend_from_slice(&u16::try_from(4 + padded).unwrap().to_be_bytes());
        m.extend_from_slice(&MAGIC.to_be_bytes());
        m.extend_from_slice(&trans_id);
        m.extend_from_slice(&attr.to_be_bytes());
        m.extend_from_slice(&u16::try_from(value.len()).unwrap().to_be_bytes());
        m.extend_from_slice(value);
        m.resize(20 + 4 + padded, 0);
        m
    }

    #[test]
    fn xor_mapped_v4_and_v6() {
        let t = [7u8; 12];
        // 198.51.100.11:40000 XORed with the cookie.
        let port = 40000u16 ^ 0x2112;
        let ip = [198 ^ 0x21, 51 ^ 0x12, 100 ^ 0xA4, 11 ^ 0x42];
        let mut v = vec![0, 1];
        v.extend_from_slice(&port.to_be_bytes());
        v.extend_from_slice(&ip);
        let r = response(t, XOR_MAPPED_ADDRESS, &v);
        assert_eq!(
            binding_success(&r),
            Some((t, "198.51.100.11:40000".parse().unwrap()))
        );
        let want: Ipv6Addr = "2001:db8::5".parse().unwrap();
        let mut key = MAGIC.to_be_bytes().to_vec();
        key.extend_from_slice(&t);
        let mut v = vec![0, 2];
        v.extend_from_slice(&port.to_be_bytes());
        v.extend(want.octets().iter().zip(&key).map(|(a, b)| a ^ b));
        let r = response(t, XOR_MAPPED_ADDRESS, &v);
        assert_eq!(
            binding_success(&r).map(|x| x.1),
            Some(SocketAddr::new(want.into(), 40000))
        );
        assert_eq!(binding_request(t).len(), 20);
    }

    #[test]
    fn allocate_401() {
        let mut m = Vec::new();
        m.extend_from_slice(&ALLOCATE_ERROR.to_be_bytes());
        m.extend_from_slice(&16u16.to_be_bytes());
        m.extend_from_slice(&MAGIC.to_be_bytes());
        m.extend_from_slice(&[1; 12]);
        m.extend_from_slice(&ERROR_CODE.to_be_bytes());
        m.extend_from_slice(&12u16.to_be_bytes());
        m.extend_from_slice(&[0, 0, 4, 1]);
        m.extend_from_slice(b"Unauthorized");
        assert_eq!(error_response(&m), Some((ALLOCATE_ERROR, 401, [1; 12])));
        assert_eq!(error_response(&binding_request([0; 12])), None);
    }

    proptest::proptest! {
        #[test]
        fn never_panics(data: Vec<u8>) {
            let _ = binding_success(&data);
            let _ = error_response(&data);
        }
    }
}
