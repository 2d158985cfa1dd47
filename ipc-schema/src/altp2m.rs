//! The altp2m interface: what the vmm (and later others) ask the altp2m
//! service, which owns every domain's views.

use crate::hypercall::{Reply, Request};
use crate::ipc::InterfaceId;
use postcard::experimental::max_size::MaxSize;
use serde::{Deserialize, Serialize};

/// A request about a domain's views.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema)]
pub enum AltRequest {
    /// A guest's hypercall request, on behalf of `domain`'s vCPU `vcpu`.
    Guest {
        domain: u16,
        vcpu: u16,
        request: Request,
    },
    /// Does nothing: for measuring an IPC round trip.
    Ping,
}

/// The answer: the hypercall reply, or `Pong`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, MaxSize, postcard_schema::Schema)]
pub enum AltReply {
    Guest(Reply),
    Pong,
}

pub const ALTP2M: InterfaceId = InterfaceId::new::<(AltRequest, AltReply)>("parallax/altp2m");

crate::assert_fits!(AltRequest, AltReply);
