//! Page sharing through the console's sharing service (issue 11, SH-1..SH-4;
//! docs/sharing.md): `cargo hv ctl share` is built on these.

use super::{Client, ClientError, ControlReply, ControlRequest, Transport, unwanted};
pub use ipc_schema::sharing::{ShError, ShReply, ShRequest, ShStatus};

impl<T: Transport> Client<T> {
    /// Any sharing request, its answer as it is (a refusal is
    /// [`ClientError::Sharing`]).
    pub fn share(&mut self, request: ShRequest) -> Result<ShReply, ClientError> {
        self.ensure_hello()?;
        match self.call_labelled(ControlRequest::Share(request))? {
            (label, ControlReply::Share(ShReply::Error(error))) => Err(ClientError::Sharing {
                request: label,
                error,
            }),
            (_, ControlReply::Share(r)) => Ok(r),
            (label, other) => Err(unwanted(label, other)),
        }
    }

    /// SH-1: a handle for page `gfn` of `domain`: (handle, references of
    /// its frame, frames free).
    pub fn share_nominate(
        &mut self,
        domain: u16,
        gfn: u64,
    ) -> Result<(u64, u32, u64), ClientError> {
        match self.share(ShRequest::Nominate { domain, gfn })? {
            ShReply::Nominated { handle, refs, free } => Ok((handle, refs, free)),
            other => Err(odd(&other)),
        }
    }

    /// SH-1: the client page maps the source's frame: (references, free).
    pub fn share_pages(&mut self, source: u64, client: u64) -> Result<(u32, u64), ClientError> {
        match self.share(ShRequest::Share { source, client })? {
            ShReply::Shared { refs, free } => Ok((refs, free)),
            other => Err(odd(&other)),
        }
    }

    /// SH-1: page `gfn` of `domain` gets its own frame: (references left
    /// on the frame it left, free).
    pub fn share_unshare(&mut self, domain: u16, gfn: u64) -> Result<(u32, u64), ClientError> {
        match self.share(ShRequest::Unshare { domain, gfn })? {
            ShReply::Unshared { refs, free } => Ok((refs, free)),
            other => Err(odd(&other)),
        }
    }

    /// Deduplication (issue 11, point 4): scans `domains` from the start,
    /// `batch` pages per request, until the scan is complete: (pages
    /// scanned, frames saved).
    pub fn share_scan(&mut self, domains: &[u16], batch: u32) -> Result<(u64, u64), ClientError> {
        let mut list = ipc_schema::ipc::BoundedVec::new();
        for &d in domains {
            list.0.push(d).map_err(|_| {
                ClientError::Invalid(format!(
                    "a scan covers at most {} domains",
                    ipc_schema::sharing::MAX_SCAN_DOMAINS
                ))
            })?;
        }
        if batch == 0 {
            return Err(ClientError::Invalid(
                "a batch of 0 pages scans nothing".into(),
            ));
        }
        let (mut from, mut pages, mut saved) = (0u64, 0u64, 0u64);
        loop {
            let request = ShRequest::Scan {
                domains: list.clone(),
                from,
                pages: batch,
            };
            match self.share(request)? {
                ShReply::Scanned {
                    pages: p,
                    saved: s,
                    next,
                } => {
                    pages += u64::from(p);
                    saved += u64::from(s);
                    match next {
                        // A scan that did not move on would never end.
                        Some(n) if n > from || from == 0 => from = n,
                        Some(_) => {
                            return Err(ClientError::Invalid("the scan did not move on".into()));
                        }
                        None => return Ok((pages, saved)),
                    }
                }
                other => return Err(odd(&other)),
            }
        }
    }

    /// What is shared now.
    pub fn share_status(&mut self) -> Result<ShStatus, ClientError> {
        match self.share(ShRequest::Status)? {
            ShReply::Status(s) => Ok(s),
            other => Err(odd(&other)),
        }
    }
}

fn odd(r: &ShReply) -> ClientError {
    ClientError::Invalid(format!("the sharing service answered {r:?}"))
}

/// What a refusal means.
pub fn describe_error(e: &ShError) -> String {
    match e {
        ShError::NoSuchDomain => "no live domain has that id".into(),
        ShError::NotRam => "the gfn is not the domain's RAM".into(),
        ShError::StaleHandle => {
            "the handle names nothing (never given, used up, or its page changed since: nominate it again)".into()
        }
        ShError::SamePage => "source and client are the same page".into(),
        ShError::AlreadyShared => "the client maps the source's frame already".into(),
        ShError::ModifiedInView { view } => format!(
            "the page is modified in view {view} (an access setting or a change_gfn), so it cannot be shared (SH-3)"
        ),
        ShError::NotShared => "the page is not shared".into(),
        ShError::Busy => "the page cannot change frames now (foreign mappings of the domain, its #VE information page, or the kernel's table of shared frames is full)".into(),
        ShError::OutOfMemory => "no frame is free for a private copy".into(),
        ShError::TooManyHandles { limit } => {
            format!("the sharing service keeps at most {limit} handles")
        }
        ShError::Altp2m => {
            "the altp2m service (which owns the EPT entries) refused or could not be reached".into()
        }
    }
}

/// A status line.
pub fn status_line(s: &ShStatus) -> String {
    format!(
        "{} shared frame(s) back {} page(s): {} frame(s) saved; {} handle(s); {} copy-on-write break(s); {} frames free",
        s.frames, s.pages, s.saved, s.handles, s.breaks, s.free
    )
}

/// The status as one JSON object.
pub fn status_json(s: &ShStatus) -> String {
    format!(
        "{{\"frames\":{},\"pages\":{},\"saved\":{},\"handles\":{},\"breaks\":{},\"free\":{}}}",
        s.frames, s.pages, s.saved, s.handles, s.breaks, s.free
    )
}
