//! The control channel from the host: the client library is the
//! `parallax-client` crate (re-exported here whole, so that
//! `image_builder::control::Client` and the rest keep working), and
//! [`proxy`] is what `cargo hv run` serves the console's COM2 with
//! ([`router`]: how several clients share the console).

pub use parallax_client::*;

pub mod proxy;
pub mod router;
