//! `cargo hv`: the Parallax developer tool, as a library that the CLI and the
//! boot tests share.
//!
//! - [`image`]: manifest to bootable ISO ([`manifest`], [`compile`], [`iso`]).
//! - [`emulator`]: boot an image on QEMU, Bochs or KVM and decode its log.
//! - [`logs`]: the log wire: demultiplexing and defmt decoding.
//! - [`control`]: the control channel's client library (talk to a running
//!   image's console over COM2) and the proxy `cargo hv run` serves it with.
//! - [`bench`]: benchmark figures measured by a guest on Bochs.
//! - [`profile`]: where one benchmark operation's instructions go.
//! - [`deps`]: the Debian packages it all needs.

pub mod bench;
pub mod compile;
pub mod control;
pub mod deps;
pub mod elf;
pub mod emulator;
pub mod image;
pub mod iso;
pub mod logs;
pub mod manifest;
pub mod paths;
pub mod profile;
pub mod progress;
