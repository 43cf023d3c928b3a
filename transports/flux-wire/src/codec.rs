//! Primitive encoders and a bounds-checked reader.
//!
//! Integers that are usually small use the QUIC variable-length encoding (RFC 9000 §16): the two
//! high bits of the first byte give the length (1, 2, 4 or 8 bytes), so values up to 2^62-1 fit.

use crate::DecodeError;

/// Largest value a varint can carry.
pub const VARINT_MAX: u64 = (1 << 62) - 1;

/// Bytes a varint of `v` takes. Values above [`VARINT_MAX`] are a caller bug; they are encoded
/// saturated (see [`put_varint`]).
pub const fn varint_len(v: u64) -> usize {
    if v < 1 << 6 {
        1
    } else if v < 1 << 14 {
        2
    } else if v < 1 << 30 {
        4
    } else {
        8
    }
}

/// Appends `v` as a varint. Values above [`VARINT_MAX`] are clamped to it: every encoder in this
/// crate only passes lengths and counts bounded far below that.
pub fn put_varint(out: &mut Vec<u8>, v: u64) {
    let v = v.min(VARINT_MAX);
    match varint_len(v) {
        1 => out.push(v as u8),
        2 => out.extend_from_slice(&((v as u16) | 0x4000).to_be_bytes()),
        4 => out.extend_from_slice(&((v as u32) | 0x8000_0000).to_be_bytes()),
        _ => out.extend_from_slice(&(v | 0xc000_0000_0000_0000).to_be_bytes()),
    }
}

/// Bytes a length-prefixed byte string of `len` bytes takes.
pub const fn bytes_len(len: usize) -> usize {
    varint_len(len as u64) + len
}

/// Appends a varint length followed by the bytes.
pub fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// A cursor over untrusted bytes. Every read checks bounds and returns a typed error; nothing
/// here panics or allocates more than the input it was given.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Reads from `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    /// Bytes not yet consumed.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Fails with [`DecodeError::TrailingBytes`] unless everything was consumed.
    pub fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes)
        }
    }

    /// Takes the next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.buf.len() {
            return Err(DecodeError::UnexpectedEnd);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    /// Takes exactly `N` bytes as an array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    /// Reads one byte.
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    /// Reads a big-endian u16.
    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    /// Reads a big-endian u32.
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    /// Reads a big-endian u64.
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// Reads a big-endian i64.
    pub fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array()?))
    }

    /// Reads a varint.
    pub fn varint(&mut self) -> Result<u64, DecodeError> {
        let first = *self.buf.first().ok_or(DecodeError::UnexpectedEnd)?;
        let len = 1usize << (first >> 6);
        let raw = self.take(len)?;
        let mut v = u64::from(first & 0x3f);
        for b in &raw[1..] {
            v = (v << 8) | u64::from(*b);
        }
        Ok(v)
    }

    /// Reads a varint that must fit a u32.
    pub fn varint_u32(&mut self) -> Result<u32, DecodeError> {
        u32::try_from(self.varint()?).map_err(|_| DecodeError::BadValue("integer exceeds u32"))
    }

    /// Reads a length-prefixed byte string of at most `max` bytes.
    pub fn bytes(&mut self, max: usize) -> Result<&'a [u8], DecodeError> {
        let len = self.varint()?;
        if len > max as u64 {
            return Err(DecodeError::TooLong {
                len,
                max: max as u64,
            });
        }
        // `len <= max <= usize::MAX` so the cast is lossless.
        self.take(len as usize)
    }

    /// Reads a length-prefixed UTF-8 string of at most `max` bytes.
    pub fn string(&mut self, max: usize) -> Result<String, DecodeError> {
        let b = self.bytes(max)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| DecodeError::InvalidUtf8)
    }

    /// Reads an element count and checks that `count` elements of at least `min_elem` encoded
    /// bytes each could fit in what is left, so a hostile count never drives an allocation.
    pub fn count(&mut self, min_elem: usize) -> Result<usize, DecodeError> {
        let n = self.varint()?;
        let fits = (self.remaining() / min_elem.max(1)) as u64;
        if n > fits {
            return Err(DecodeError::BadLength);
        }
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_boundaries_round_trip() {
        for v in [0, 63, 64, 16383, 16384, (1 << 30) - 1, 1 << 30, VARINT_MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(out.len(), varint_len(v), "len of {v}");
            let mut r = Reader::new(&out);
            assert_eq!(r.varint().unwrap(), v);
            r.finish().unwrap();
        }
    }

    #[test]
    fn varint_truncated_is_unexpected_end() {
        let mut out = Vec::new();
        put_varint(&mut out, 1 << 40);
        for cut in 0..out.len() {
            assert_eq!(
                Reader::new(&out[..cut]).varint(),
                Err(DecodeError::UnexpectedEnd)
            );
        }
    }

    #[test]
    fn hostile_count_is_refused_before_allocating() {
        let mut out = Vec::new();
        put_varint(&mut out, 1_000_000_000);
        out.extend_from_slice(&[0; 16]);
        assert_eq!(Reader::new(&out).count(4), Err(DecodeError::BadLength));
    }
}
