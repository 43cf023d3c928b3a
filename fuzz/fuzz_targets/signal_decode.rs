//! Arbitrary text through the signaling message decoders (what thruserv reads from clients and
//! `thru` reads from a server): never a panic; what decodes re-encodes and decodes to itself.
#![no_main]
use flux_signal_proto::{decode_client, decode_server};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(m) = decode_client(text) {
        let again = decode_client(&m.encode());
        assert_eq!(again.as_ref(), Ok(&m), "client message round trip");
    }
    if let Ok(m) = decode_server(text) {
        let again = decode_server(&m.encode());
        assert_eq!(again.as_ref(), Ok(&m), "server message round trip");
    }
});
