//! Typing into a domain's COM1 (`cargo hv ctl console DOMAIN` is built on
//! this): bytes go to the console, which passes them to the vmm, which puts
//! them in the domain's receive FIFO. A FIFO the guest has not read takes
//! fewer bytes than it is given; [`Client::console_input`] sends the rest
//! again until all are taken, so nothing typed is lost.

use super::{Client, ClientError, ControlReply, ControlRequest, Transport, unwanted};
use ipc_schema::ipc::BoundedVec;
pub use ipc_schema::uart::{INPUT_CHUNK, UartReply};
use std::time::{Duration, Instant};

/// How long to wait before sending again what a full FIFO did not take.
const RETRY: Duration = Duration::from_millis(20);

impl<T: Transport> Client<T> {
    /// One request: up to [`INPUT_CHUNK`] bytes for `domain`'s COM1. How
    /// many were taken (from the first), and how many wait in its FIFO,
    /// unread by the guest.
    pub fn console_input_once(
        &mut self,
        domain: u16,
        bytes: &[u8],
    ) -> Result<(usize, usize), ClientError> {
        let mut chunk = BoundedVec::new();
        chunk
            .0
            .extend_from_slice(&bytes[..bytes.len().min(INPUT_CHUNK)])
            .expect("at most a chunk");
        self.ensure_hello()?;
        match self.call_labelled(ControlRequest::ConsoleInput {
            domain,
            bytes: chunk,
        })? {
            (_, ControlReply::Uart(UartReply::Taken { count, waiting })) => {
                Ok((usize::from(count), usize::from(waiting)))
            }
            (_, ControlReply::Uart(UartReply::NoSuchDomain)) => Err(ClientError::Invalid(format!(
                "domain {domain} has no COM1 to type into: the vmm keeps no devices for it (it does not exist, has not started or has ended)"
            ))),
            (label, other) => Err(unwanted(label, other)),
        }
    }

    /// All of `bytes` for `domain`'s COM1, in order: what its full receive
    /// FIFO does not take is sent again once the guest has read some. Fails
    /// when the guest has read nothing for the client's timeout (saying how
    /// many bytes were taken), or as [`Self::console_input_once`] does.
    pub fn console_input(&mut self, domain: u16, bytes: &[u8]) -> Result<(), ClientError> {
        let mut sent = 0;
        let mut progress = Instant::now();
        while sent < bytes.len() {
            let (taken, _) = self.console_input_once(domain, &bytes[sent..])?;
            sent += taken;
            if taken > 0 {
                progress = Instant::now();
                continue;
            }
            if progress.elapsed() >= self.timeout {
                return Err(ClientError::Invalid(format!(
                    "domain {domain}'s guest has read nothing from its COM1 for {:.1} s (its receive FIFO is full): {sent} of {} bytes were taken",
                    self.timeout.as_secs_f64(),
                    bytes.len()
                )));
            }
            std::thread::sleep(RETRY);
        }
        Ok(())
    }
}
