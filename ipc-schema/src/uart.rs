//! Input for a domain's 16550 (COM1): bytes the host types, passed by the
//! console to the vmm, which puts them in the domain's receive FIFO
//! (`cargo hv ctl console DOMAIN`, docs/control.md). Each domain's FIFO is
//! its own quota: one domain's input never fills another's. A full FIFO
//! takes fewer bytes than it is given (`Taken`), and the sender tries the
//! rest again: nothing is dropped.

use crate::ipc::{BoundedVec, InterfaceId};
use postcard::experimental::max_size::MaxSize;
use serde::{Deserialize, Serialize};

/// The most bytes one request carries.
pub const INPUT_CHUNK: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema)]
pub struct UartInput {
    pub domain: u16,
    pub bytes: BoundedVec<u8, INPUT_CHUNK>,
}

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema,
)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum UartReply {
    /// The first `count` bytes were taken; `waiting` bytes (those included)
    /// are in the FIFO, not yet read by the guest.
    Taken { count: u16, waiting: u16 },
    /// The vmm keeps no devices for this domain: it does not exist, has not
    /// started or has ended.
    NoSuchDomain,
}

pub const UART_INPUT: InterfaceId =
    InterfaceId::new::<(UartInput, UartReply)>("parallax/uart-input");

crate::assert_fits!(UartInput, UartReply);
