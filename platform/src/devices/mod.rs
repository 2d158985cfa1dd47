//! Models of the few devices Parallax emulates for its guests.

pub mod uart16550;
