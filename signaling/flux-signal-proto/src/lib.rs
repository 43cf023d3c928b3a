//! Thruflux signaling messages (serde) and join-code routing ids (sans-IO)
