//! A domain: a guest's RAM (the host p2m), its views, its vCPU and its state,
//! built from a manifest entry and a multiboot guest image.

use super::dirty::DirtyLog;
use super::memory::{KernelTables, alloc_zeroed_contiguous, alloc_zeroed_frame, free_frame};
use super::vcpu::{Vcpu, VcpuError, VcpuSetup};
use super::views::Views;
use super::{Features, MAX_CONSOLE};
use crate::mem::phys_to_virt;
use ipc_schema::hypercall::HcError;
use ipc_schema::manifest;
use platform::PAGE_SIZE;
use platform::ept::{EptError, MemoryType, PageSize, Perms};
use platform::multiboot::{self, GuestLayout, INFO_GPA, INFO_SIZE, ImageError};
use platform::vmx::VmxCaps;

const MIB2: u64 = 2 << 20;

/// How a domain's life ended, or that it goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, defmt::Format)]
pub enum DomainState {
    Running,
    /// The guest asked to end, with this status.
    Exited(u32),
    /// Stopped by the hypervisor (reported when it happened).
    Crashed,
}

/// Why a domain could not be built.
#[derive(Clone, Copy, Debug, defmt::Format)]
pub enum BuildError {
    Image(ImageError),
    OutOfMemory,
    Ept(EptError),
    Vcpu(VcpuError),
    /// More vCPUs than this kernel runs per domain.
    TooManyVcpus {
        asked: u8,
    },
    /// The command line does not fit the information block.
    CmdlineTooLong,
}

impl From<EptError> for BuildError {
    fn from(e: EptError) -> Self {
        match e {
            EptError::OutOfMemory => BuildError::OutOfMemory,
            other => BuildError::Ept(other),
        }
    }
}

/// One guest domain.
pub struct Domain {
    pub id: u16,
    pub name: &'static str,
    pub ram_bytes: u64,
    pub views: Views,
    pub vcpu: Vcpu,
    pub state: DomainState,
    /// Console bytes not yet sent (a line at a time).
    pub console: heapless::Vec<u8, MAX_CONSOLE>,
    pub dirty: DirtyLog,
    /// What the exit handler keeps per domain.
    pub policy: crate::vmm::DomainPolicy,
    msr_bitmap: u64,
}

impl Domain {
    /// Builds domain `id` from its manifest entry and guest image: RAM, host
    /// p2m, the image loaded, the information block, the vCPU at the entry.
    pub fn build(
        id: u16,
        spec: &manifest::Domain<'static>,
        image: &[u8],
        caps: &VmxCaps,
        features: &Features,
    ) -> Result<Domain, BuildError> {
        if spec.vcpus != 1 {
            return Err(BuildError::TooManyVcpus { asked: spec.vcpus });
        }
        let ram_bytes = u64::from(spec.memory_mib) << 20;
        let layout = GuestLayout::new(ram_bytes);
        let plan = multiboot::plan(image, &layout).map_err(BuildError::Image)?;
        let views = Views::new(features.vmfunc, features.ept_ad, features.invept)
            .ok_or(BuildError::OutOfMemory)?;
        let mut partial = Partial {
            views: Some(views),
            dirty: None,
            msr_bitmap: None,
        };
        partial.dirty = Some(DirtyLog::new(ram_bytes).ok_or(BuildError::OutOfMemory)?);
        partial.msr_bitmap = Some(msr_bitmap().ok_or(BuildError::OutOfMemory)?);
        let views = partial.views.as_mut().expect("set above");
        populate(views, &layout)?;
        for s in &plan.segments {
            let bytes = &image[s.file_offset..s.file_offset + s.file_len];
            write_guest_checked(views, s.gpa, bytes).ok_or(BuildError::Image(
                ImageError::OutsideRam {
                    start: s.gpa,
                    end: s.gpa + s.mem_len,
                },
            ))?;
        }
        // Like GRUB and QEMU, the command line starts with the image's name.
        let mut cmdline: heapless::String<256> = heapless::String::new();
        let fits = cmdline.push_str(spec.guest).is_ok()
            && (spec.cmdline.is_empty()
                || (cmdline.push(' ').is_ok() && cmdline.push_str(spec.cmdline).is_ok()));
        if !fits {
            return Err(BuildError::CmdlineTooLong);
        }
        let mut info = [0u8; INFO_SIZE];
        let n = multiboot::build_info(ram_bytes, &cmdline, "Parallax", &mut info)
            .map_err(|_| BuildError::CmdlineTooLong)?;
        write_guest_checked(views, INFO_GPA, &info[..n]).ok_or(BuildError::OutOfMemory)?;

        let msr_bitmap = partial.msr_bitmap.expect("set above");
        let setup = VcpuSetup {
            id: 0,
            vpid: id + 1,
            entry: plan.entry,
            eptp: views.host().eptp(features.ept_ad),
            eptp_list: views.eptp_list(),
            msr_bitmap,
            slice: features.slice,
        };
        let vcpu = Vcpu::new(&setup, caps).map_err(BuildError::Vcpu)?;
        // Built: the domain owns everything from here on.
        let views = partial.views.take().expect("set above");
        let dirty = partial.dirty.take().expect("set above");
        partial.msr_bitmap = None;
        Ok(Domain {
            id,
            name: spec.name,
            ram_bytes,
            views,
            vcpu,
            state: DomainState::Running,
            console: heapless::Vec::new(),
            dirty,
            policy: crate::vmm::DomainPolicy::default(),
            msr_bitmap,
        })
    }

    /// Whether `gfn` is guest RAM (mapped in the host p2m).
    pub fn is_ram(&self, gfn: u64) -> bool {
        gfn.checked_mul(PAGE_SIZE)
            .is_some_and(|gpa| self.views.host().query(&KernelTables, gpa).is_some())
    }

    /// Copies guest memory at `gpa` into `out`; `None` if any byte is not RAM.
    pub fn read_guest(&self, gpa: u64, out: &mut [u8]) -> Option<()> {
        let mut done = 0;
        while done < out.len() {
            let at = gpa.checked_add(done as u64)?;
            let hpa = self.views.host().translate(&KernelTables, at)?;
            let n = (out.len() - done).min((PAGE_SIZE - at % PAGE_SIZE) as usize);
            // Safety: `hpa` is a frame of this domain's RAM (the host p2m maps
            // only frames the kernel gave it), in the direct map; n stays in
            // the page.
            unsafe {
                core::ptr::copy_nonoverlapping(phys_to_virt(hpa), out[done..].as_mut_ptr(), n)
            };
            done += n;
        }
        Some(())
    }

    /// Copies `bytes` into guest memory at `gpa`; `None` if any byte is not RAM.
    pub fn write_guest(&self, gpa: u64, bytes: &[u8]) -> Option<()> {
        write_guest_checked(&self.views, gpa, bytes)
    }

    /// Gives every frame and table of the domain back.
    pub fn destroy(mut self) {
        free_ram(&self.views);
        self.views.destroy_all();
        self.dirty.destroy();
        free_frame(self.msr_bitmap);
        self.vcpu.destroy();
    }
}

/// What a build has allocated so far; given back if the build fails.
struct Partial {
    views: Option<Views>,
    dirty: Option<DirtyLog>,
    msr_bitmap: Option<u64>,
}

impl Drop for Partial {
    fn drop(&mut self) {
        if let Some(mut v) = self.views.take() {
            free_ram(&v);
            v.destroy_all();
        }
        if let Some(d) = self.dirty.take() {
            d.destroy();
        }
        if let Some(m) = self.msr_bitmap.take() {
            free_frame(m);
        }
    }
}

/// Gives back every RAM frame the host p2m maps.
fn free_ram(views: &Views) {
    views
        .host()
        .for_each_leaf(&KernelTables, 0, platform::ept::GPA_LIMIT, |m| {
            for f in 0..m.size.bytes() / PAGE_SIZE {
                free_frame(m.hpa + f * PAGE_SIZE);
            }
        });
}

/// Maps the domain's RAM in the host p2m: 4 KiB pages below 2 MiB (leaving
/// the legacy hole 0xa0000-0xfffff unmapped), 2 MiB pages from there where a
/// 2 MiB-aligned block of frames is free, 4 KiB pages elsewhere.
fn populate(views: &mut Views, layout: &GuestLayout) -> Result<(), BuildError> {
    let ept = views.host_mut();
    let mut gpa = 0;
    while gpa < layout.ram_bytes {
        let left = layout.ram_bytes - gpa;
        if gpa % MIB2 == 0
            && gpa >= MIB2
            && left >= MIB2
            && let Some(hpa) = alloc_zeroed_contiguous(512, 512)
        {
            ept.map(
                &mut KernelTables,
                gpa,
                hpa,
                PageSize::Size2M,
                Perms::ALL,
                MemoryType::WRITE_BACK,
            )
            .inspect_err(|_| free_range(hpa, MIB2))?;
            gpa += MIB2;
            continue;
        }
        if gpa >= layout.hole.0 && gpa < layout.hole.1 {
            gpa = layout.hole.1;
            continue;
        }
        let hpa = alloc_zeroed_frame().ok_or(BuildError::OutOfMemory)?;
        ept.map(
            &mut KernelTables,
            gpa,
            hpa,
            PageSize::Size4K,
            Perms::ALL,
            MemoryType::WRITE_BACK,
        )
        .inspect_err(|_| free_frame(hpa))?;
        gpa += PAGE_SIZE;
    }
    Ok(())
}

fn free_range(hpa: u64, len: u64) {
    for f in 0..len / PAGE_SIZE {
        free_frame(hpa + f * PAGE_SIZE);
    }
}

fn write_guest_checked(views: &Views, gpa: u64, bytes: &[u8]) -> Option<()> {
    let mut done = 0;
    while done < bytes.len() {
        let at = gpa.checked_add(done as u64)?;
        let hpa = views.host().translate(&KernelTables, at)?;
        let n = (bytes.len() - done).min((PAGE_SIZE - at % PAGE_SIZE) as usize);
        // Safety: `hpa` is a frame of this domain's RAM, in the direct map;
        // n stays in the page.
        unsafe { core::ptr::copy_nonoverlapping(bytes[done..].as_ptr(), phys_to_virt(hpa), n) };
        done += n;
    }
    Some(())
}

/// An MSR bitmap that intercepts every MSR except those VMX switches itself
/// between guest and host (EFER, PAT, FS/GS base, SYSENTER): their guest
/// values live in the VMCS.
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
        0xc000_0100,
        0xc000_0101,
    ] {
        pass(msr);
    }
    Some(page)
}

/// Checks a gfn named by a request: RAM, or an error naming it.
pub fn check_gfn(d: &Domain, gfn: u64) -> Result<u64, HcError> {
    if d.is_ram(gfn) {
        Ok(gfn * PAGE_SIZE)
    } else {
        Err(HcError::BadGfn { gfn })
    }
}
