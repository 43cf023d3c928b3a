//! Thruflux signaling: the thruserv server and the client library
