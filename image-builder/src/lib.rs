//! `cargo hv`: the Parallax developer tool, as a library that the CLI and the
//! boot tests share.
//!
//! - [`image`]: manifest to bootable ISO ([`manifest`], [`compile`], [`iso`]).
//! - [`emulator`]: boot an image on QEMU, Bochs or KVM and decode its log.
//! - [`logs`]: the log wire: demultiplexing and defmt decoding.
//! - [`control`]: the control channel: the `parallax-client` crate re-exported (talk to a running
//!   image's console over COM2) and the proxy `cargo hv run` serves it with.
//! - [`bench`]: benchmark figures measured by a guest on Bochs.
//! - [`profile`]: where one benchmark operation's instructions go.
//! - [`linux`]: Debian's packaged Linux and an initramfs, as a guest.
//! - [`deps`]: the Debian packages and the Rust target it all needs.

pub mod bench;
pub mod compile;
pub mod control;
pub mod deps;
pub mod elf;
pub mod emulator;
pub mod image;
pub mod iso;
pub mod linux;
pub mod logs;
pub mod manifest;
pub mod paths;
pub mod profile;
pub mod progress;
pub mod suite;

/// The exit status of `cargo hv` when the tool itself fails (bad arguments, a
/// missing file, a failed build, no running system to talk to). Kept apart
/// from the kernel's halt statuses (0-4) that `cargo hv run` passes on, from
/// 124 (timeout) and 125 (the emulator ended without a halt record).
pub const TOOL_ERROR: u8 = 100;

/// The exit status of `cargo hv run`, `ctl logs` and `log` when the run
/// (or the capture) ended without a halt record.
pub const NO_HALT: u8 = 125;
