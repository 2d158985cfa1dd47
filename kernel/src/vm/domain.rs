//! A domain: guest RAM (the host p2m), views, a vCPU, and its state. Init
//! builds domains through system calls: create, map RAM from frames it
//! holds, write the guest image, create the vCPU, start.

use super::caps;
use super::memory::{KernelTables, alloc_zeroed_frame, free_frame};
use super::vcpu::{Vcpu, VcpuSetup};
use super::views::Views;
use crate::mem::phys_to_virt;
use ipc_schema::syscall::{DomainState, HandleName};
use ipc_schema::vmexit::Exit;
use platform::PAGE_SIZE;
use platform::ept::{EptError, MemoryType, PageSize, Perms};

const MIB2: u64 = 2 << 20;

/// The local APIC's xAPIC page (0xfee00000): where the CPU virtualizes
/// APIC accesses, the host p2m maps the APIC-access frame
/// (`Features::apic_access`). It is not RAM: no service reads or writes
/// it through the kernel, no view operation reaches it.
pub const XAPIC_GFN: u64 = 0xfee00;

/// One guest domain.
pub struct Domain {
    /// 1-based, as guests and logs see it.
    pub id: u16,
    pub name: HandleName,
    /// The end of the highest RAM mapped.
    pub ram_bytes: u64,
    /// RAM as mapped: (first gfn, first frame's address, frames), to find
    /// the gfn behind a frame.
    pub ram: heapless::Vec<(u64, u64, u64), 64>,
    pub views: Views,
    pub vcpu: Option<Vcpu>,
    pub state: DomainState,
    pub exit_status: u32,
    /// Guest memory the kernel wrote for services, while recorded
    /// (`VcpuOp::WritesLog`, taken with DOMAIN_WRITES).
    pub writes: Option<WriteLog>,
    /// Where a full PML buffer is sent, while PML is on.
    pub pml_endpoint: Option<u16>,
    /// Frames whose armed entries a write lifted (`EptOp::ArmLift`), for
    /// the EPT owner to take (LIFTED_TAKE). Full, the kernel lifts nothing
    /// more and the faults go to the owner as any violation.
    pub lifted: heapless::Vec<u64, LIFTED>,
    /// An entry of one of its views was armed (`EptOp::ArmLift`): until
    /// then a write violation is not looked up for one.
    pub lift_armed: bool,
    msr_bitmap: u64,
    /// Where the vCPU's exits and EPT violations go (endpoint ids).
    pub exit_endpoint: u16,
    pub violation_endpoint: u16,
    pub exit_seq: u32,
    pub exit_server: Option<u16>,
    /// The endpoint the pending exit went to.
    pub last_endpoint: u16,
    /// The endpoint whose handler asked for a single step (it gets the
    /// monitor-trap exit).
    pub step_endpoint: Option<u16>,
    pub awaiting_reply: bool,
    /// The pending exit was forwarded (REPLY_RECV's forward): its holder
    /// may only answer it plainly (`exitcodec::restricted_ok`).
    pub exit_restricted: bool,
    pub pending: Option<Exit>,
    /// The exit the fast path passed on, before it is decoded.
    pub pending_raw: Option<super::vcpu::RawExit>,
    /// When its vCPU's time slice ends (TSC), while others wait; 0: no
    /// slice running.
    pub slice_end: u64,
    /// Its exit handler heard that the vCPU starts (`ExitKind::Start`).
    pub started: bool,
    /// Not started or unpaused while `foreign_ungranted` is not 0 (FM-2).
    pub protected: bool,
    /// Which domain this is of all made since boot (DOMAIN_INFO's R10):
    /// ids are given again, births never, so that a service tells a new
    /// domain from the one its records are of.
    pub birth: u64,
    /// Pages of its RAM services hold foreign-mapped (FOREIGN_MAP; FM-1).
    pub foreign_pages: u32,
    /// Those of them not mapped within pages the guest grants.
    pub foreign_ungranted: u32,
    /// The ranges (gfn, count) of its RAM the guest itself grants
    /// (DOMAIN_GRANT, on its hypercall): FM-2's exception.
    pub guest_grants: heapless::Vec<(u64, u64), { ipc_schema::syscall::GUEST_GRANTS }>,
    /// VM fork (docs/sharing.md): the domain this one is a fork of. Its
    /// host p2m maps the parent's frames read-only where it has not
    /// written ([`super::shared::forked`]).
    pub parent: Option<u16>,
    /// Forks of this domain alive: while any is, its memory does not
    /// change (it is not unpaused, written for services, destroyed, or
    /// given other frames).
    pub forks: u16,
    /// Its gfns that map a frame other than their RAM frame (a shared
    /// frame, or a copy of its own: every page a fork wrote), in frames of
    /// its own table quota (docs/sharing.md).
    pub backs: platform::records::Records,
}

/// Why a domain operation was refused.
#[derive(Clone, Copy, Debug, defmt::Format)]
pub enum DomainError {
    OutOfMemory,
    Ept(EptError),
    /// Not in the state the operation needs (building, running...).
    WrongState,
    /// A guest frame range that runs past the top of the address space.
    BadRange,
}

impl From<EptError> for DomainError {
    fn from(e: EptError) -> Self {
        match e {
            EptError::OutOfMemory => DomainError::OutOfMemory,
            other => DomainError::Ept(other),
        }
    }
}

/// The next domain's birth.
static BIRTHS: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(1);

impl Domain {
    /// Whether process `pid` holds this vCPU's exit of sequence `seq` (the
    /// one its reply token names), unanswered.
    pub fn held_by(&self, pid: u16, seq: u32) -> bool {
        self.awaiting_reply && self.exit_seq == seq && self.exit_server == Some(pid)
    }

    /// An empty domain: no RAM, no vCPU.
    pub fn create(id: u16, name: HandleName, protected: bool) -> Result<Domain, DomainError> {
        let f = super::features();
        let mut views = Views::new(f.vmfunc, f.ept_ad, f.invept).ok_or(DomainError::OutOfMemory)?;
        // The first frame of its records, taken now and kept while it
        // lives: a domain's first shared or copied pages change the free
        // frames by their own frames alone (SH-4's counts stay exact).
        let mut backs = platform::records::Records::new();
        let msr_bitmap = match (backs.reserve(&mut views.tables), msr_bitmap()) {
            (Ok(()), Some(msr_bitmap)) => msr_bitmap,
            (_, bitmap) => {
                if let Some(bitmap) = bitmap {
                    free_frame(bitmap);
                }
                backs.clear(&mut views.tables);
                views.destroy_all();
                return Err(DomainError::OutOfMemory);
            }
        };
        Ok(Domain {
            id,
            name,
            birth: BIRTHS.fetch_add(1, core::sync::atomic::Ordering::Relaxed),
            ram_bytes: 0,
            ram: heapless::Vec::new(),
            views,
            vcpu: None,
            state: DomainState::Building,
            exit_status: 0,
            writes: None,
            pml_endpoint: None,
            lifted: heapless::Vec::new(),
            lift_armed: false,
            msr_bitmap,
            exit_endpoint: 0,
            violation_endpoint: 0,
            exit_seq: 0,
            exit_server: None,
            last_endpoint: 0,
            step_endpoint: None,
            awaiting_reply: false,
            exit_restricted: false,
            pending: None,
            pending_raw: None,
            slice_end: 0,
            started: false,
            protected,
            foreign_pages: 0,
            foreign_ungranted: 0,
            guest_grants: heapless::Vec::new(),
            parent: None,
            forks: 0,
            backs,
        })
    }

    /// Whether pages `gfn .. gfn + count` lie within one range the guest
    /// grants.
    pub fn grants_cover(&self, gfn: u64, count: u64) -> bool {
        self.guest_grants
            .iter()
            .any(|&(g, n)| g <= gfn && gfn.saturating_add(count) <= g + n)
    }

    /// Maps `count` frames from `base` as guest RAM at `gfn`: 2 MiB pages where
    /// both sides are 2 MiB aligned, 4 KiB pages elsewhere.
    pub fn map_ram(&mut self, gfn: u64, base: u64, count: u64) -> Result<(), DomainError> {
        // Once built, only past the end of its RAM (shadow frames: outside
        // the memory map the guest was given, docs/introspection.md).
        let running = matches!(self.state, DomainState::Running | DomainState::Paused);
        let beyond = gfn
            .checked_mul(PAGE_SIZE)
            .is_some_and(|g| g >= self.ram_bytes);
        if !(self.state == DomainState::Building || running && beyond) || self.ram.is_full() {
            return Err(DomainError::WrongState);
        }
        // `gfn` and `count` come from the builder: the range must end inside
        // the address space before anything is mapped.
        let (Some(gpa), Some(end)) = (
            gfn.checked_mul(PAGE_SIZE),
            gfn.checked_add(count)
                .and_then(|e| e.checked_mul(PAGE_SIZE)),
        ) else {
            return Err(DomainError::BadRange);
        };
        let (ept, tables) = self.views.ept_mut(0).map_err(|_| DomainError::BadRange)?;
        // Each 2 MiB of RAM raises the domain's table quota.
        let more = u32::try_from(count / 512 + 1).unwrap_or(u32::MAX);
        tables.limit = tables
            .limit
            .saturating_add(more.saturating_mul(super::memory::DomainTables::PER_2M));
        let (mut gpa, mut hpa) = (gpa, base);
        while gpa < end {
            let large = gpa % MIB2 == 0 && hpa % MIB2 == 0 && end - gpa >= MIB2;
            let size = if large {
                PageSize::Size2M
            } else {
                PageSize::Size4K
            };
            ept.map(tables, gpa, hpa, size, Perms::ALL, MemoryType::WRITE_BACK)?;
            gpa += size.bytes();
            hpa += size.bytes();
        }
        self.ram_bytes = self.ram_bytes.max(end);
        let _ = self.ram.push((gfn, base, count));
        if running {
            self.views.flush(0);
        }
        Ok(())
    }

    /// The gfn whose host-p2m mapping is the frame at `hpa` (a frame that
    /// page sharing put behind a gfn included: docs/sharing.md).
    pub fn gfn_of_frame(&self, hpa: u64) -> Option<u64> {
        // Its RAM frame at a gfn that maps it (a look-up by key), else a
        // frame one of its records names (a scan of them).
        self.ram
            .iter()
            .find(|(_, base, count)| hpa >= *base && hpa < base + count * PAGE_SIZE)
            .map(|(gfn, base, _)| gfn + (hpa - base) / PAGE_SIZE)
            .filter(|&gfn| super::shared::backing(self, gfn).is_none())
            .or_else(|| super::shared::gfn_backed_by(self, hpa))
    }

    /// The frame the host p2m maps at `gfn` that a service may map: the
    /// domain's RAM frame, or the frame of its own a copy-on-write break
    /// gave it; `None` for a shared frame (SH-2: no service maps one).
    pub fn frame_of_gfn(&self, gfn: u64) -> Option<u64> {
        if let Some(own) = super::shared::backing(self, gfn) {
            return own;
        }
        self.ram_frame(gfn)
    }

    /// The RAM frame the builder mapped at `gfn`.
    pub fn ram_frame(&self, gfn: u64) -> Option<u64> {
        self.ram
            .iter()
            .find(|(first, _, count)| gfn >= *first && gfn - first < *count)
            .map(|(first, base, _)| base + (gfn - first) * PAGE_SIZE)
    }

    /// The frame the CPU writes #VE information into, while #VE is on.
    /// `Err` when the vCPU's VMCS cannot be loaded (it runs elsewhere).
    pub fn ve_info_frame(&mut self) -> Result<Option<u64>, ()> {
        use platform::vmx::fields::VE_INFO_ADDRESS;
        match self.vcpu.as_mut() {
            Some(v) if v.secondary(platform::vmx::proc2::EPT_VIOLATION_VE) => {
                v.load().map_err(|_| ())?;
                Ok(Some(v.read(VE_INFO_ADDRESS) & !(PAGE_SIZE - 1)))
            }
            _ => Ok(None),
        }
    }

    /// Copies guest memory at `gpa` into `out`; `None` if any byte is not RAM.
    pub fn read_guest(&self, gpa: u64, out: &mut [u8]) -> Option<()> {
        let mut done = 0;
        while done < out.len() {
            let at = gpa.checked_add(done as u64)?;
            let hpa = self.ram_hpa(at)?;
            let n = (out.len() - done).min((PAGE_SIZE - at % PAGE_SIZE) as usize);
            // Safety: `hpa` is a frame of this domain's RAM (the host p2m maps
            // only frames given to it), in the direct map; n stays in the page.
            unsafe {
                core::ptr::copy_nonoverlapping(phys_to_virt(hpa), out[done..].as_mut_ptr(), n)
            };
            done += n;
        }
        Some(())
    }

    /// Copies `bytes` into guest memory at `gpa`; `None` (and nothing
    /// written) if any byte is not RAM.
    /// A fork's page that still maps its parent's frame gets its own copy
    /// first (VM fork's copy on write, as for the guest's own write).
    pub fn write_guest(&mut self, gpa: u64, bytes: &[u8]) -> Option<()> {
        let end = gpa.checked_add(bytes.len() as u64)?;
        let mut page = gpa & !(PAGE_SIZE - 1);
        while page < end && self.parent.is_some() {
            if super::shared::forked(self, page / PAGE_SIZE) {
                let m = self.views.host().query(&KernelTables, page)?;
                let p = m.perms;
                let perms = ipc_schema::syscall::Perms {
                    read: p.read,
                    write: false,
                    execute: p.execute,
                };
                super::shared::unshare(self, page / PAGE_SIZE, perms).ok()?;
            }
            page += PAGE_SIZE;
        }
        let mut page = gpa & !(PAGE_SIZE - 1);
        while page < end {
            // SH-2: the kernel never writes a shared frame for a service,
            // nor a parent's memory while forks map it.
            let hpa = self.ram_hpa(page)?;
            if super::shared::is_shared_frame(hpa) || self.forks != 0 {
                return None;
            }
            page += PAGE_SIZE;
        }
        let mut done = 0;
        while done < bytes.len() {
            let at = gpa + done as u64;
            let hpa = self.ram_hpa(at)?;
            let n = (bytes.len() - done).min((PAGE_SIZE - at % PAGE_SIZE) as usize);
            // Safety: as in `read_guest`.
            unsafe { core::ptr::copy_nonoverlapping(bytes[done..].as_ptr(), phys_to_virt(hpa), n) };
            done += n;
        }
        Some(())
    }

    /// Whether `gfn` is guest RAM (mapped in the host p2m, and not the
    /// xAPIC page).
    /// Where an EPT violation at `gpa` whose entry allowed nothing goes: a
    /// gfn that is not the domain's RAM (nor its mapped xAPIC page, which
    /// allows reads and writes) is a device's or nothing's, not the p2m
    /// owner's, and the exit handler emulates the access (docs/p2m.md,
    /// MMIO). Both exit paths ask this.
    pub fn no_access_endpoint(&self, gpa: u64) -> u16 {
        if self.is_ram(gpa / PAGE_SIZE) {
            self.violation_endpoint
        } else {
            self.exit_endpoint
        }
    }

    pub fn is_ram(&self, gfn: u64) -> bool {
        gfn != XAPIC_GFN
            && gfn
                .checked_mul(PAGE_SIZE)
                .is_some_and(|gpa| self.views.host().query(&KernelTables, gpa).is_some())
    }

    /// The host-physical address of RAM at `gpa` (the host p2m's; never
    /// the xAPIC page's APIC-access frame).
    fn ram_hpa(&self, gpa: u64) -> Option<u64> {
        if gpa / PAGE_SIZE == XAPIC_GFN {
            return None;
        }
        self.views.host().translate(&KernelTables, gpa)
    }

    /// Maps the APIC-access frame at the xAPIC page in the host p2m
    /// (read and write, never execute: a fetch there is an EPT violation);
    /// `None` where the CPU does not virtualize the page or the mapping
    /// could not be made (the page is then absent, as before).
    fn map_xapic(&mut self, frame: Option<u64>) -> Option<u64> {
        let frame = frame?;
        let (ept, tables) = self.views.ept_mut(0).ok()?;
        let gpa = XAPIC_GFN * PAGE_SIZE;
        if ept.query(&KernelTables, gpa).is_none() {
            ept.map(
                tables,
                gpa,
                frame,
                PageSize::Size4K,
                Perms::READ_WRITE,
                MemoryType::UNCACHEABLE,
            )
            .ok()?;
        }
        Some(frame)
    }

    /// Creates the vCPU at a 32-bit entry point; its exits go to `exit_ep`,
    /// its EPT violations to `violation_ep`.
    pub fn create_vcpu(
        &mut self,
        entry: u32,
        rax: u64,
        rbx: u64,
        exit_ep: u16,
        violation_ep: u16,
    ) -> Result<(), DomainError> {
        if self.vcpu.is_some() || self.state != DomainState::Building {
            return Err(DomainError::WrongState);
        }
        let (vmx_caps, f) = caps();
        let apic_access = self.map_xapic(f.apic_access);
        let setup = VcpuSetup {
            id: 0,
            vpid: self.id,
            entry,
            eptp: self.views.host().eptp(f.ept_ad),
            eptp_list: self.views.eptp_list(),
            msr_bitmap: self.msr_bitmap,
            slice: f.slice,
            apic_access,
        };
        let mut vcpu = Vcpu::new(&setup, vmx_caps).map_err(|e| {
            defmt::error!("domain {=u16}: vCPU setup failed: {}", self.id, e);
            DomainError::OutOfMemory
        })?;
        vcpu.regs.rax = rax;
        vcpu.regs.rbx = rbx;
        self.vcpu = Some(vcpu);
        self.exit_endpoint = exit_ep;
        self.violation_endpoint = violation_ep;
        Ok(())
    }

    /// Gives back what the domain's tables, vCPU and logs hold (not its RAM:
    /// those frames belong to the frames objects the builder holds).
    pub fn destroy(mut self) {
        // SH-4: its references to shared frames, and its copies (their
        // records are in frames of its tables' quota: first).
        super::shared::release(&mut self);
        self.views.destroy_all();
        free_frame(self.msr_bitmap);
        if let Some(v) = self.vcpu.take() {
            v.destroy();
        }
    }
}

/// An MSR bitmap that intercepts every MSR except those VMX switches itself
/// between guest and host (EFER, PAT, FS/GS base, SYSENTER): their guest
/// values live in the VMCS; and the SYSCALL MSRs (STAR, LSTAR, CSTAR,
/// SFMASK) and KERNEL_GS_BASE, which the host never uses (ring 3 enters the
/// kernel by `int 0x80` and the host's EFER.SCE is clear, so SYSCALL there
/// is #UD), and which `cpustate` switches between vCPUs.
fn msr_bitmap() -> Option<u64> {
    let page = alloc_zeroed_frame()?;
    // Safety: a frame we just allocated, in the direct map.
    let bits = unsafe { &mut *phys_to_virt(page).cast::<[u8; 4096]>() };
    bits.fill(0xff);
    // Read-low 0..1024, read-high 1024..2048, write-low 2048..3072, write-high 3072..4096.
    let mut pass = |msr: u32| {
        let (base, index) = if msr >= 0xc000_0000 {
            (1024, msr - 0xc000_0000)
        } else {
            (0, msr)
        };
        let (byte, bit) = (base + (index / 8) as usize, index % 8);
        bits[byte] &= !(1 << bit);
        bits[byte + 2048] &= !(1 << bit);
    };
    for msr in [
        0x174,
        0x175,
        0x176,
        0x277,
        0xc000_0080,
        0xc000_0081,
        0xc000_0082,
        0xc000_0083,
        0xc000_0084,
        0xc000_0100,
        0xc000_0101,
        0xc000_0102,
    ] {
        pass(msr);
    }
    Some(page)
}

/// Guest memory the kernel wrote on services' behalf (DOMAIN_WRITE), as
/// (first gfn, pages) runs, for whoever logs the domain's writes: such
/// writes go around the EPT, so neither its dirty bits nor PML see them.
#[derive(Default)]
pub struct WriteLog {
    pub runs: heapless::Vec<(u64, u64), 32>,
    /// Some writes were not recorded (the record was full).
    pub overflow: bool,
}

impl WriteLog {
    /// Records a write of `len` bytes at `gpa` (`len` > 0).
    pub fn record(&mut self, gpa: u64, len: u64) {
        let first = gpa / PAGE_SIZE;
        let last = (gpa + (len - 1)) / PAGE_SIZE;
        let pages = last - first + 1;
        if let Some((g, n)) = self.runs.last_mut()
            && first >= *g
            && first <= *g + *n
        {
            *n = (*n).max(first + pages - *g);
            return;
        }
        if self.runs.push((first, pages)).is_err() {
            self.overflow = true;
        }
    }
}

/// Lifted frames a domain records at most between two takes.
pub const LIFTED: usize = 256;
