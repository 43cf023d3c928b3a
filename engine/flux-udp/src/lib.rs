//! UDP socket layer: GSO, GRO, socket buffers, capability probing
