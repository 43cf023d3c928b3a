//! zstd compression of chunks, run where hashing runs (the work threads, or inline): the
//! machines only ask for it (`DiskOp::Read::compress`, `DiskOp::WriteChunk::compressed`).
//!
//! Each thread keeps one compression and one decompression context, reused for every chunk:
//! creating a context costs more than compressing a small chunk.

use std::cell::RefCell;

use bytes::Bytes;
use flux_transfer::DiskFailure;

thread_local! {
    static CCTX: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { RefCell::new(None) };
    static DCTX: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// `data` as a zstd frame at `level`, when the frame is smaller than `data`; `None` when it is
/// not (incompressible data: the output buffer, one byte short of the input, overflows and
/// zstd gives up) or zstd fails.
pub fn compress(data: &[u8], level: i32) -> Option<Bytes> {
    if data.len() < 64 {
        return None;
    }
    CCTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(l, _)| *l != level) {
            *slot = Some((level, zstd::bulk::Compressor::new(level).ok()?));
        }
        let (_, c) = slot.as_mut()?;
        let mut out = Vec::with_capacity(data.len() - 1);
        match c.compress_to_buffer(data, &mut out) {
            Ok(n) if n < data.len() => Some(Bytes::from(out)),
            _ => None,
        }
    })
}

/// Decompresses the frame `src` into `dst`, which must come out filled exactly: zstd writes
/// no byte past `dst` (a frame that would grow further, a decompression bomb, fails), and a
/// frame that ends short is refused as well.
pub fn decompress_exact(src: &[u8], dst: &mut [u8]) -> Result<(), DiskFailure> {
    DCTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            let d = zstd::bulk::Decompressor::new()
                .map_err(|e| DiskFailure::Io(format!("zstd: {e}")))?;
            *slot = Some(d);
        }
        let Some(d) = slot.as_mut() else {
            return Err(DiskFailure::Io("zstd: no decompression context".into()));
        };
        match d.decompress_to_buffer(src, dst) {
            Ok(n) if n == dst.len() => Ok(()),
            Ok(n) => Err(DiskFailure::Decompress(format!(
                "it decompressed to {n} bytes where {} were declared",
                dst.len()
            ))),
            Err(e) => Err(DiskFailure::Decompress(format!(
                "it does not decompress to the {} bytes declared ({e})",
                dst.len()
            ))),
        }
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips_and_random_data_is_left_plain() {
        let text: Vec<u8> = (0..100_000u32)
            .flat_map(|i| format!("line {i} GET /index.html 200\n").into_bytes())
            .collect();
        let c = compress(&text, 1).unwrap();
        assert!(c.len() * 4 < text.len());
        let mut back = vec![0u8; text.len()];
        decompress_exact(&c, &mut back).unwrap();
        assert_eq!(back, text);

        let mut x = 0x2545_f491_4f6c_dd1du64;
        let random: Vec<u8> = (0..1 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(compress(&random, 1).is_none());
    }

    #[test]
    fn a_bomb_or_a_short_frame_is_refused() {
        let zeros = vec![0u8; 8 << 20];
        let bomb = compress(&zeros, 3).unwrap();
        assert!(bomb.len() < 4096);
        // Declared as 1 MiB: the frame would write 8 MiB; zstd stops at the buffer's end.
        let mut dst = vec![0u8; 1 << 20];
        let e = decompress_exact(&bomb, &mut dst).unwrap_err();
        assert!(matches!(e, DiskFailure::Decompress(_)), "{e:?}");
        // Declared longer than it is.
        let mut dst = vec![0u8; (8 << 20) + 1];
        let e = decompress_exact(&bomb, &mut dst).unwrap_err();
        assert!(e.to_string().contains("declared"), "{e}");
        // Garbage.
        let e = decompress_exact(b"not a zstd frame at all", &mut [0u8; 64]).unwrap_err();
        assert!(matches!(e, DiskFailure::Decompress(_)), "{e:?}");
    }
}
