//! Guest state that VM entry and exit do not switch, switched here.
//!
//! VMX loads and saves a guest's control registers, segments, RIP, RSP,
//! RFLAGS, DR7 and a few MSRs through the VMCS, but not its FPU, SSE and AVX
//! registers (the XSAVE state), DR0-DR3, DR6, CR2, IA32_KERNEL_GS_BASE
//! (which the guest's SWAPGS writes) or the SYSCALL MSRs (STAR, LSTAR,
//! CSTAR, SFMASK), the last five written by the guest directly (the MSR
//! bitmap lets them through). Left alone, one domain would read what
//! another left there. The kernel and the services never touch these
//! registers (they are built soft-float and use no debug registers, CR2
//! only in fault reports, no SWAPGS), so the CPU's copy belongs to one vCPU
//! at a time: the one that last ran. Entering another vCPU first saves the
//! owner's copy into its save area and loads the newcomer's. A vCPU that
//! keeps running pays one comparison per entry.
//!
//! Each vCPU's save area is one frame: the XSAVE image at offset 0 (sized
//! from CPUID leaf 0xD for the components the kernel enables in XCR0: x87,
//! SSE, AVX and AVX-512 where present), the other registers at
//! [`REGS_AT`]. A fresh area holds the architectural reset state.

use core::sync::atomic::{AtomicU64, Ordering};

/// Where in the save area the debug registers, CR2 and the MSRs go.
const REGS_AT: usize = 3840;
/// IA32_KERNEL_GS_BASE.
const KERNEL_GS_BASE: u32 = 0xc000_0102;
/// The SYSCALL MSRs, saved after KERNEL_GS_BASE: STAR, LSTAR, CSTAR,
/// SFMASK. The host never executes SYSCALL (its EFER.SCE is clear).
const SYSCALL_MSRS: [u32; 4] = [0xc000_0081, 0xc000_0082, 0xc000_0083, 0xc000_0084];
/// XCR0 components the kernel enables: x87, SSE, AVX, AVX-512 (opmask,
/// ZMM_Hi256, Hi16_ZMM), where the CPU has them.
const XCR0_WANTED: u64 = 0b1110_0111;

/// How the FPU state is saved: XSAVE with this XCR0, or FXSAVE (0).
static XCR0: AtomicU64 = AtomicU64::new(0);
/// The save area (physical address) of the vCPU whose state the CPU holds;
/// 0 for none. (One CPU runs guests.)
static OWNER: AtomicU64 = AtomicU64::new(0);

/// Turns on what saving guest state needs (CR4.OSFXSR, and CR4.OSXSAVE with
/// XCR0 where the CPU has XSAVE). Runs before any VMCS records the host's
/// CR4. Returns the XCR0 in use (0: FXSAVE).
pub fn init() -> u64 {
    use x86_64::registers::control::{Cr4, Cr4Flags};
    let leaf1 = platform::cpu::cpuid(1, 0);
    let mut cr4 = Cr4::read() | Cr4Flags::OSFXSR | Cr4Flags::OSXMMEXCPT_ENABLE;
    let xsave = leaf1.ecx & (1 << 26) != 0;
    if xsave {
        cr4 |= Cr4Flags::OSXSAVE;
    }
    // Safety: FXSAVE/XSAVE support is what CPUID reports; the flags only
    // enable instructions (the kernel itself runs no SSE code).
    unsafe { Cr4::write(cr4) };
    if !xsave {
        return 0;
    }
    let leaf_d = platform::cpu::cpuid(0xd, 0);
    let supported = u64::from(leaf_d.eax) | (u64::from(leaf_d.edx) << 32);
    let mut xcr0 = supported & XCR0_WANTED;
    // AVX-512 only as a whole, AVX only with SSE (XCR0 rules).
    if xcr0 & 0b1110_0000 != 0b1110_0000 {
        xcr0 &= !0b1110_0000;
    }
    set_xcr0(xcr0);
    if platform::cpu::cpuid(0xd, 0).ebx as usize > REGS_AT {
        xcr0 &= !0b1110_0000;
        set_xcr0(xcr0);
    }
    XCR0.store(xcr0, Ordering::Relaxed);
    xcr0
}

fn set_xcr0(xcr0: u64) {
    // Safety: CR4.OSXSAVE is on and `xcr0` holds x87 and only components
    // CPUID reports, in combinations the architecture allows.
    unsafe {
        core::arch::asm!("xsetbv", in("ecx") 0, in("eax") xcr0 as u32,
            in("edx") (xcr0 >> 32) as u32, options(nomem, nostack, preserves_flags));
    }
}

/// Fills a fresh save area (a zeroed frame, direct-mapped at `area`) with
/// the reset state: FCW 0x37f, MXCSR 0x1f80, DR6 0xffff0ff0.
pub fn reset(area: *mut u8) {
    // Safety: `area` is a whole zeroed frame the caller owns.
    unsafe {
        area.cast::<u16>().write(0x37f);
        area.add(24).cast::<u32>().write(0x1f80);
        area.add(REGS_AT + 4 * 8).cast::<u64>().write(0xffff_0ff0);
    }
}

/// Makes the CPU hold the state of the vCPU whose save area is `area`
/// (physical), saving the previous owner's first.
#[inline(always)]
pub fn switch_to(area: u64) {
    if OWNER.load(Ordering::Relaxed) != area {
        switch_slow(area);
    }
}

#[inline(never)]
fn switch_slow(area: u64) {
    let owner = OWNER.load(Ordering::Relaxed);
    if owner != 0 {
        // Safety: `owner` is the save area of a live vCPU (`forget` clears
        // OWNER before an area is freed).
        unsafe { save(crate::mem::phys_to_virt(owner)) };
    }
    // Safety: `area` is the caller's vCPU's save area.
    unsafe { load(crate::mem::phys_to_virt(area)) };
    OWNER.store(area, Ordering::Relaxed);
}

/// Brings the save area `area` up to date if the CPU holds that vCPU's
/// state (for a fork, which copies it).
pub fn flush(area: u64) {
    if OWNER.load(Ordering::Relaxed) == area && area != 0 {
        // Safety: `area` is the save area of the live vCPU that owns the
        // CPU's copy; saving leaves that copy in place.
        unsafe { save(crate::mem::phys_to_virt(area)) };
    }
}

/// The vCPU with save area `area` goes away: the CPU's copy is nobody's.
pub fn forget(area: u64) {
    if OWNER.load(Ordering::Relaxed) == area {
        OWNER.store(0, Ordering::Relaxed);
    }
}

/// # Safety
/// `area` is a save-area frame, 64-byte aligned, direct-mapped.
unsafe fn save(area: *mut u8) {
    let xcr0 = XCR0.load(Ordering::Relaxed);
    // Safety: the caller's contract; XSAVE/FXSAVE write at most REGS_AT
    // bytes (checked in `init`), the registers go after them.
    unsafe {
        if xcr0 != 0 {
            core::arch::asm!("xsave64 [{}]", in(reg) area, in("eax") xcr0 as u32,
                in("edx") (xcr0 >> 32) as u32, options(nostack, preserves_flags));
        } else {
            core::arch::asm!("fxsave64 [{}]", in(reg) area, options(nostack, preserves_flags));
        }
        let regs = area.add(REGS_AT).cast::<u64>();
        let (dr0, dr1, dr2, dr3, dr6, cr2): (u64, u64, u64, u64, u64, u64);
        core::arch::asm!(
            "mov {}, dr0", "mov {}, dr1", "mov {}, dr2", "mov {}, dr3", "mov {}, dr6", "mov {}, cr2",
            out(reg) dr0, out(reg) dr1, out(reg) dr2, out(reg) dr3, out(reg) dr6, out(reg) cr2,
            options(nomem, nostack, preserves_flags));
        for (i, v) in [dr0, dr1, dr2, dr3, dr6, cr2].into_iter().enumerate() {
            regs.add(i).write(v);
        }
        regs.add(6).write(platform::cpu::rdmsr(KERNEL_GS_BASE));
        for (i, msr) in SYSCALL_MSRS.into_iter().enumerate() {
            regs.add(7 + i).write(platform::cpu::rdmsr(msr));
        }
    }
}

/// # Safety
/// As for [`save`]; the area holds a state saved by [`save`] or [`reset`].
unsafe fn load(area: *mut u8) {
    let xcr0 = XCR0.load(Ordering::Relaxed);
    // Safety: the caller's contract; the image is one XSAVE/FXSAVE wrote or
    // the reset state, so XRSTOR/FXRSTOR accept it.
    unsafe {
        if xcr0 != 0 {
            core::arch::asm!("xrstor64 [{}]", in(reg) area, in("eax") xcr0 as u32,
                in("edx") (xcr0 >> 32) as u32, options(nostack, preserves_flags));
        } else {
            core::arch::asm!("fxrstor64 [{}]", in(reg) area, options(nostack, preserves_flags));
        }
        let regs = area.add(REGS_AT).cast::<u64>();
        let r = |i| regs.add(i).read();
        core::arch::asm!(
            "mov dr0, {}", "mov dr1, {}", "mov dr2, {}", "mov dr3, {}", "mov dr6, {}", "mov cr2, {}",
            in(reg) r(0), in(reg) r(1), in(reg) r(2), in(reg) r(3), in(reg) r(4), in(reg) r(5),
            options(nomem, nostack, preserves_flags));
        // A non-canonical value cannot be there: it was read from the MSR
        // or is the reset value 0.
        platform::cpu::wrmsr(KERNEL_GS_BASE, r(6));
        // The same for LSTAR and CSTAR (canonical, or the guest's WRMSR
        // would have faulted); STAR and SFMASK take any value (SFMASK's
        // upper half is reserved and was read as 0).
        for (i, msr) in SYSCALL_MSRS.into_iter().enumerate() {
            platform::cpu::wrmsr(msr, r(7 + i));
        }
    }
}
