//! thruserv: the Thruflux signaling server.
fn main() {}
