//! Thread-per-core io_uring runtime: rings, aligned buffers, O_DIRECT files
